"""One trial: the published two-stage transfer learning of one backbone with one hyperparameter set.

Stage 1 ("head") trains the new head on a frozen backbone with Adam(lr_head); stage 2 ("finetune")
makes the last `unfreeze_layers` backbone layers trainable and continues with Adam(lr_finetune).
Each stage has early stopping on val_loss with its best weights restored, and reduce-LR-on-plateau
(patience // 2).

Honest evaluation: validation is computed once per epoch from the model's own predictions (val_loss,
val_accuracy and val_macro_f1 from the same pass); the test split is opened only with
`evaluate_test=True`. Input comes from the study's uint8 pixel cache (memory-mapped), batched by
index, never decoded again. The code uses `keras` only, so it runs on TensorFlow and on JAX.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from fer.core.config import make_config, save_config
from fer.core.errors import UserError
from fer.core.files import write_json
from fer.core.names import (
    CONFIG_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    RECORD_KEYS,
    SUMMARY_FILE,
    metrics_file,
)
from fer.data.batches import FeatureViews, PixelBatches, model_input, predict_probs
from fer.evaluate.metrics import classification_metrics, macro_f1
from fer.evaluate.on_split import evaluate_split
from fer.model.build import build_model, set_stage
from fer.train.collapse import CollapseLog
from fer.train.stage_programs import StagePrograms, compile_stage

log = logging.getLogger(__name__)


def save_model_atomically(model: keras.Model, path: Path) -> None:
    """Write `path` via a temporary file and a rename, so a trial killed mid-save never leaves a
    torn model."""
    partial = path.with_name(path.stem + ".partial.keras")  # Keras insists on the .keras extension
    model.save(partial)
    os.replace(partial, path)


class EpochMonitor(keras.callbacks.Callback):
    """Validates after every epoch, keeps the best weights, saves the best model, reports the
    record.

    It must run first among the callbacks: it writes val_loss into the epoch logs that EarlyStopping
    and ReduceLROnPlateau then read. The best model (lowest val_loss over the whole trial) is saved
    to `model.keras` BEFORE `on_epoch` is called whenever that report may be the trial's last (every
    report by default; in a study, the scheduler's decision epochs: `report_can_stop`), so a
    scheduler that stops the trial right after a report still leaves the best model on disk
    (docs/pitfalls.md#last-report). Saving only there, and once at the end, spares a model write per
    improving epoch (0.3 s for MobileNetV2 on a CPU).

    With a frozen-feature cache (`head_features` / `finetune_features` = cached) the fitted model is
    a head-only or tail model sharing its layers with the full model: `val_inputs` are then the
    cached val inputs and `full_model` is what is saved and remembered as the trial's best.
    """

    def __init__(
        self, trial: _TrialState, stage: str, val_inputs=None, full_model: keras.Model | None = None
    ):
        super().__init__()
        self.trial, self.stage = trial, stage
        self.val_inputs, self.full_model = val_inputs, full_model
        self.stage_best_loss = math.inf
        self.stage_best_weights = None
        self.first_batch_s = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if (
            batch == 0 and self.first_batch_s is None
        ):  # the stage's first step: includes graph compilation
            self.first_batch_s = now - self.epoch_start
        if batch > 0:  # end-to-end interval: the step plus all input and callback work around it
            self.trial.step_s.setdefault(self.stage, []).append(now - self.last_batch_end)
        self.last_batch_end = now

    def on_epoch_end(self, epoch, logs=None):
        t = self.trial
        train_s = time.perf_counter() - self.epoch_start
        probs = predict_probs(
            self.model, t.val_pixels if self.val_inputs is None else self.val_inputs, t.batch_size
        )
        val_loss = float(keras.ops.convert_to_numpy(t.loss_fn(t.val_onehot, probs)))
        pred = probs.argmax(axis=1)
        logs["val_loss"] = val_loss
        logs["val_accuracy"] = float(np.mean(pred == t.val_labels))
        t.global_epoch += 1
        record = {
            "epoch": t.global_epoch,
            "stage": self.stage,
            "loss": float(logs.get("loss", math.nan)),
            "accuracy": float(logs.get("accuracy", math.nan)),
            "val_loss": val_loss,
            "val_accuracy": logs["val_accuracy"],
            "val_macro_f1": macro_f1(t.val_labels, pred, t.num_classes),
            "lr": self.lr,
            "epoch_s": time.perf_counter() - self.epoch_start,
            "images_per_s": t.n_train / train_s,
        }
        t.train_s.setdefault(self.stage, []).append(train_s)
        if self.first_batch_s is not None and t.first_batch_s.get(self.stage) is None:
            t.first_batch_s[self.stage] = self.first_batch_s
        if math.isfinite(val_loss) and val_loss < self.stage_best_loss:
            self.stage_best_loss = val_loss
            self.stage_best_weights = self.model.get_weights()
            if val_loss < t.best_record.get("val_loss", math.inf):
                full = self.full_model or self.model
                t.best_record, t.best_val_probs = record, probs
                t.best_weights = (
                    self.stage_best_weights if full is self.model else full.get_weights()
                )
        if t.report_can_stop(t.global_epoch):
            t.save_best(self.full_model or self.model)
        t.history.append(record)
        t.write_history()
        t.stage_last_epoch[self.stage] = t.global_epoch
        t.collapse.check(
            self.stage, record, probs, t.classes
        )  # fer/train/collapse.py: collapse.json, at once
        if t.on_epoch is not None:
            t.on_epoch(dict(record))

    def on_train_end(self, logs=None):
        self.trial.collapse.stage_ended(self.stage, self.trial.stage_last_epoch.get(self.stage))
        if self.stage_best_weights is not None:  # restore the stage's best-val-loss weights
            self.model.set_weights(self.stage_best_weights)


class _TrialState:
    """What the stages share: validation data, the running history and the best model so far."""

    def __init__(
        self,
        out_dir: Path,
        val_pixels,
        val_labels,
        num_classes,
        batch_size,
        n_train,
        loss_fn,
        on_epoch,
        report_can_stop: Callable[[int], bool] | None = None,
    ):
        self.out_dir, self.val_pixels, self.val_labels = out_dir, val_pixels, val_labels
        self.num_classes, self.batch_size = num_classes, batch_size
        self.n_train = n_train  # images trained per epoch
        self.val_onehot = np.eye(num_classes, dtype=np.float32)[val_labels]
        self.loss_fn, self.on_epoch = loss_fn, on_epoch
        self.global_epoch = 0
        self.history: list[dict] = []
        self.best_record: dict = {}
        self.best_weights = None
        self.best_val_probs = (
            None  # val predictions of the best epoch (the final val metrics reuse them)
        )
        self.saved_epoch = None  # the epoch whose weights model.keras holds
        self.report_can_stop = report_can_stop or (lambda epoch: True)
        self.train_s: dict[str, list[float]] = {}  # per stage: training seconds of each epoch
        self.first_batch_s: dict[str, float] = {}
        self.step_s: dict[
            str, list[float]
        ] = {}  # per stage: seconds between consecutive batch ends
        self.stage_last_epoch: dict[str, int] = {}
        self.classes: list[str] | None = None
        self.collapse = None  # a fer.train.collapse.CollapseLog, set by run_trial

    def save_best(self, full_model: keras.Model, at_best: bool | None = None) -> None:
        """Make model.keras hold the best weights so far (written only when it does not already).
        `at_best`: the model holds them right now (default: the best epoch is the current one)."""
        epoch = self.best_record.get("epoch")
        if epoch is None or epoch == self.saved_epoch:
            return
        if at_best is None:
            at_best = epoch == self.global_epoch
        if at_best:
            save_model_atomically(full_model, self.out_dir / MODEL_FILE)
        else:
            # an earlier epoch was the best: write its weights, then carry on from the current ones
            current = full_model.get_weights()
            full_model.set_weights(self.best_weights)
            save_model_atomically(full_model, self.out_dir / MODEL_FILE)
            full_model.set_weights(current)
        self.saved_epoch = epoch

    def write_history(self) -> None:
        pd.DataFrame(self.history, columns=list(RECORD_KEYS)).to_csv(
            self.out_dir / HISTORY_FILE, index=False
        )


def fresh_keras_state() -> None:
    """Before a trial in a process that already ran one (a warm study worker, `run`'s default;
    benchmarks/compile_reuse.py): drop everything an earlier trial left in Keras' global state
    (models, layer-name counters, the default dtype policy, TensorFlow's registrations that keep
    every traced train step alive: `fer.runtime.backend.release_traced_graphs`); the trial's seeds
    are set by build_model (keras.utils.set_random_seed) or, for a kept model, restored by
    `_build_or_reuse`. tests/test_reuse.py checks that a trial in a reused worker, after a trial
    that raised and one with a NaN loss, repeats a fresh process's epochs number for number.

    A worker that keeps its model (`run_trial(reuse_model=True)`) keeps the session until it builds
    another model (`_build_or_reuse` clears it then): `clear_session` also empties TensorFlow's
    kernel cache, and each put-back compiled stage then paid 0.4-1 s re-optimizing its program at
    its first step (MobileNetV2, 96 px; docs/pitfalls.md#kernel-cache). One garbage collection
    (clear_session's own is skipped): each costs ~0.35 s with a kept model."""
    import gc

    from fer.runtime.backend import release_traced_graphs

    if not _kept_model:
        keras.backend.clear_session(free_memory=False)
    keras.config.set_dtype_policy("float32")
    # else TensorFlow keeps every traced train step (docs/pitfalls.md#custom-gradient-leak)
    release_traced_graphs()
    gc.collect()


# what build_model's result depends on (dropout is a HeadDropout variable, set per trial)
MODEL_KEYS = ("backbone", "image_size", "weights", "dense_units", "augment", "seed", "bn_epsilon")
# the one model a warm worker keeps between trials (reuse_model), see _build_or_reuse
_kept_model: dict = {}


def _model_key(config: dict, num_classes: int) -> str:
    import json

    fields = {key: config.get(key) for key in MODEL_KEYS}
    if config["weights"] not in (
        "none",
        "imagenet",
    ):  # a weights file: its content counts, not only its path
        path = Path(config["weights"]).expanduser()
        stat = path.stat() if path.is_file() else None
        fields["weights_file"] = (stat.st_size, stat.st_mtime_ns) if stat else None
    fields.update(
        num_classes=num_classes,
        policy=keras.config.dtype_policy().name,
        backend=keras.backend.backend(),
    )
    return json.dumps(fields, sort_keys=True, default=str)


def _build_or_reuse(
    config: dict, num_classes: int, reuse: bool
) -> tuple[keras.Model, bool, StagePrograms | None]:
    """`build_model`, or with `reuse` the model kept from the previous trial of this process when it
    would be built the same: every variable (weights, BatchNormalization statistics, the random-seed
    states of the dropout and augmentation layers) back to its value right after that build,
    Python's and NumPy's random states back to theirs, the dropout rate set, the backbone frozen
    again. The trial then repeats a freshly built one number for number
    (tests/test_compile_reuse.py). Saves the build (seconds for a large backbone; loading a weights
    file) and, with the model's `StagePrograms` (returned third, None without `reuse`), the tracing
    of each stage whose trainable layers an earlier trial trained."""
    import random

    if not reuse:
        _drop_kept_model()
        return build_model(config, num_classes), False, None
    key = _model_key(config, num_classes)
    if _kept_model.get("key") == key:
        model = _kept_model["model"]
        for variable, value in _kept_model["initial"]:
            variable.assign(value)
        # Not keras.utils.set_random_seed: every random op of the model draws from its layers'
        # seed-generator variables (just restored), Python's and NumPy's states are put back below,
        # and the session (Keras's global seed) was kept; TensorFlow's tf.random.set_seed would also
        # empty the kernel cache, making each put-back compiled stage re-optimize its program at its
        # first step (0.4-1 s, MobileNetV2 96 px).
        random.setstate(_kept_model["python_random"])
        np.random.set_state(_kept_model["numpy_random"])
        model.get_layer("head_dropout").set_rate(config["dropout"])
        set_stage(model, "head", 0, config["unfreeze_unit"], _backbone(config))
        return model, True, _kept_model["programs"]
    _drop_kept_model()
    model = build_model(config, num_classes)
    _kept_model.update(
        key=key,
        model=model,
        initial=[(v, np.array(keras.ops.convert_to_numpy(v))) for v in model.variables],
        python_random=random.getstate(),
        numpy_random=np.random.get_state(),
        programs=StagePrograms(),
    )
    return model, False, _kept_model["programs"]


def _drop_kept_model() -> None:
    """Another model replaces the kept one: clear the Keras session fresh_keras_state left for it
    (the trial's dtype policy, already set, stays)."""
    if _kept_model:
        _kept_model.clear()
        policy = keras.config.dtype_policy()
        keras.backend.clear_session()
        keras.config.set_dtype_policy(policy)


def _dtype_policy(config: dict) -> str:
    mode = config["mixed_precision"]
    if mode == "off":
        return "float32"
    if mode == "auto":
        from fer.runtime.backend import mixed_precision_dtype

        dtype = (
            mixed_precision_dtype()
        )  # bfloat16 on compute capability >= 8, float16 below, None on CPU
        return f"mixed_{dtype}" if dtype else "float32"
    return f"mixed_{mode}"


def run_trial(
    config: dict,
    study_data,
    out_dir,
    on_epoch: Callable[[dict], None] | None = None,
    evaluate_test: bool = False,
    report_can_stop: Callable[[int], bool] | None = None,
    reuse_model: bool = False,
) -> dict:
    """Train one config on prepared study data; write the trial folder; return a summary dict.

    `reuse_model` (a warm study worker): keep the built model for the next trial in this process
    and, when that trial's model would be built the same (`_model_key`), restore its initial state
    instead of building it again (`_build_or_reuse`).

    Writes config.json, history.csv (after every epoch), model.keras (the best val_loss so far,
    before every report after which the trial may be stopped: `report_can_stop(epoch)`, default
    every epoch; always at the end), and at the end val_metrics.json; with `evaluate_test` also
    test_metrics.json and test_predictions.csv. The test split is not opened otherwise.
    """
    config = make_config(config)  # the trial's one validation (callers pass what they have)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)
    size, batch_size, classes = config["image_size"], config["batch_size"], list(study_data.classes)
    train_pixels, train_labels = study_data.pixels("train", size), study_data.labels("train")
    val_pixels, val_labels = study_data.pixels("val", size), study_data.labels("val")
    if len(train_labels) == 0 or len(val_labels) == 0:
        raise UserError(
            f"the study data has {len(train_labels)} train and {len(val_labels)} val images; a trial needs both"
        )

    from fer.runtime.backend import enable_compilation_cache

    enable_compilation_cache(
        Path(study_data.dir).parent / "compile_cache"
    )  # JAX: later trials skip compiles
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_dtype_policy(config))
    try:
        t0 = time.perf_counter()
        model, model_reused, programs = _build_or_reuse(config, len(classes), reuse_model)
        build_s = time.perf_counter() - t0
        # val_loss (computed eagerly, outside the compiled steps) with the trial's label smoothing
        loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=config["label_smoothing"])
        train_batches = PixelBatches(
            train_pixels,
            batch_size,
            train_labels,
            len(classes),
            study_data.class_weights,
            shuffle_seed=config["seed"],
            label_smoothing=config["label_smoothing"],
        )
        state = _TrialState(
            out_dir,
            val_pixels,
            val_labels,
            len(classes),
            batch_size,
            train_batches.images_per_epoch,
            loss_fn,
            on_epoch,
            report_can_stop,
        )
        state.classes, state.collapse = classes, CollapseLog(out_dir, config, len(classes))
        stages = (
            ("head", config["epochs_head"], config["lr_head"], 0),
            (
                "finetune",
                config["epochs_finetune"],
                config["lr_finetune"],
                config["unfreeze_layers"],
            ),
        )
        trainable_counts, feature_cache, reused_stages = {}, {}, {}
        for stage, epochs, lr, unfreeze in stages:
            if epochs <= 0:
                continue
            trainable_counts[stage] = set_stage(
                model,
                stage,
                unfreeze,
                config["unfreeze_unit"],
                _backbone(config),
                train_batchnorm=config["weights"] == "none",
            )
            fit_model, batches, monitor = model, train_batches, EpochMonitor(state, stage)
            if config[f"{stage}_features"] == "cached":
                fit_model, batches, monitor, feature_cache[stage] = _cached_stage(
                    model, stage, config, study_data, state
                )
            # Changing `trainable` only takes effect after compile (docs/pitfalls.md#recompile). A
            # warm worker's kept model puts back an earlier trial's compiled stage of the same
            # trainable layers instead (fer/train/stage_programs.py); a feature-cache stage fits a
            # new model each trial and compiles it.
            keeps_programs = fit_model is model and programs is not None
            if keeps_programs:
                reused_stages[stage] = programs.compile(model, lr)
            else:
                compile_stage(fit_model, lr)
            patience = config["patience"]
            callbacks = [
                monitor,  # first: it puts val_loss into the logs the others read
                keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience),
                keras.callbacks.ReduceLROnPlateau(
                    monitor="val_loss", factor=0.5, patience=max(1, patience // 2), min_lr=1e-7
                ),
                # a diverged trial stops instead of burning its budget
                keras.callbacks.TerminateOnNaN(),
            ]
            # shuffle=False (docs/pitfalls.md#keras-shuffle): the batches shuffle themselves with
            # the trial's seed; Keras's own batch-order shuffle draws from Python's global random
            # state, which Keras's first-fit build steps consume too, so a put-back stage (no build)
            # would see another order.
            fit_model.fit(batches, epochs=epochs, callbacks=callbacks, verbose=0, shuffle=False)
            if keeps_programs:
                programs.keep(model)

        if (
            state.best_weights is None
        ):  # no epoch ran (both stages at 0 epochs): keep the untrained model
            save_model_atomically(model, out_dir / MODEL_FILE)
            val_probs = predict_probs(model, val_pixels, batch_size)
        else:
            model.set_weights(state.best_weights)
            state.save_best(model, at_best=True)
            val_probs = state.best_val_probs  # what this model predicted for val at its best epoch
        train_s = sum(sum(seconds) for seconds in state.train_s.values())
        val_metrics = classification_metrics(val_labels, val_probs, classes, seed=config["seed"])
        val_metrics["val_loss"] = float(
            keras.ops.convert_to_numpy(loss_fn(state.val_onehot, val_probs))
        )
        write_json(out_dir / metrics_file("val"), val_metrics)
        summary = {
            "best_epoch": state.best_record.get("epoch"),
            "best_stage": state.best_record.get("stage"),
            "val_loss": val_metrics["val_loss"],
            "val_accuracy": val_metrics["accuracy"]["value"],
            "val_macro_f1": val_metrics["macro_f1"]["value"],
            "epochs_run": state.global_epoch,
            "train_s": train_s,
            "images_per_s": _steady_images_per_s(state, batch_size, state.train_s),
            "stage_images_per_s": {
                stage: _steady_images_per_s(state, batch_size, {stage: seconds})
                for stage, seconds in state.train_s.items()
            },
            "first_step_s": state.first_batch_s,
            # robust to a busy machine: median seconds per training step, each epoch's first step
            # excluded
            "median_step_s": {
                stage: float(np.median(steps)) for stage, steps in state.step_s.items()
            },
            "build_s": build_s,
            # reuse_model: the previous trial's model, its initial state restored
            "model_reused": model_reused,
            # per stage: an earlier trial's compiled program put back
            "compiled_stage_reused": reused_stages,
            "params": int(model.count_params()),
            "trainable_layers": trainable_counts,
            "dtype_policy": keras.config.dtype_policy().name,
            # per stage with a cache (head_features / finetune_features = cached): key, views,
            # computed here?, seconds spent getting it, bytes
            "feature_cache": feature_cache,
            # stages whose val outputs collapsed (uniform or one class), with the learning rate that
            # did it
            "collapsed_stages": state.collapse.write(state.stage_last_epoch),
        }
        if evaluate_test:
            summary.update(evaluate_split(model, study_data, "test", config, out_dir))
        write_json(out_dir / SUMMARY_FILE, summary)
        return summary
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _cached_stage(model: keras.Model, stage: str, config: dict, study_data, state: _TrialState):
    """A stage on the study's frozen-feature cache (fer.train.feature_cache): a model made of the
    SAME trainable layers (the head; in stage 2 also the unfrozen tail) fitted on precomputed
    activations of the frozen part. Returns (model to fit, batches, monitor, cache info)."""
    from fer.train import feature_cache as fc

    features, fit_model = fc.stage_features(
        model, stage, config, study_data, keras.config.dtype_policy().name
    )
    batches = FeatureViews(
        features.train,
        config["batch_size"],
        study_data.labels("train"),
        state.num_classes,
        study_data.class_weights,
        shuffle_seed=config["seed"],
        label_smoothing=config["label_smoothing"],
    )
    monitor = EpochMonitor(state, stage, val_inputs=model_input(features.val), full_model=model)
    return fit_model, batches, monitor, features.info()


def _backbone(config: dict):
    from fer.model.backbones import get_backbone

    return get_backbone(config["backbone"])


def _steady_images_per_s(
    state: _TrialState, batch_size: int, train_s: dict[str, list[float]]
) -> float | None:
    """Training images/s of the given stages without each stage's first step (its graph compilation
    is a fixed start-up cost, reported separately as `first_step_s`)."""
    epochs = sum(len(seconds) for seconds in train_s.values())
    seconds = sum(sum(s) for s in train_s.values()) - sum(
        state.first_batch_s.get(stage, 0.0) for stage in train_s
    )
    images = state.n_train * epochs - min(batch_size, state.n_train) * len(train_s)
    return images / seconds if seconds > 0 and images > 0 else None
