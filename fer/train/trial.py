"""One trial: the published two-stage transfer learning of one backbone with one hyperparameter set.

Stage 1 ("head") trains the new head on a frozen backbone with Adam(lr_head); stage 2 ("finetune")
makes the last `unfreeze_layers` backbone layers trainable and continues with Adam(lr_finetune).
Each stage has early stopping on val_loss with its best weights restored, and reduce-LR-on-plateau
(patience // 2).

Honest evaluation: validation is computed once per epoch from the model's own predictions
(fer/train/epoch_monitor.py); the test split is opened only with `evaluate_test=True`. Input comes
from the study's uint8 pixel cache (memory-mapped), batched by index, never decoded again. The code
uses `keras` only, so it runs on TensorFlow and on JAX.

`run_trial` reads top-down: set up the folder and data, get the model (fer/train/warm.py: built,
or a warm worker's kept one), train each stage, then put the best weights back, write the val
metrics and the summary.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from fer.core.config import make_config, save_config
from fer.core.files import write_json
from fer.core.names import CONFIG_FILE, MODEL_FILE, SUMMARY_FILE, metrics_file
from fer.data import StudyData
from fer.data.batches import FeatureViews, PixelBatches, model_input, predict_probs
from fer.evaluate.metrics import classification_metrics
from fer.evaluate.on_split import evaluate_split
from fer.model.backbones import get_backbone
from fer.model.build import set_stage
from fer.train.epoch_monitor import EpochMonitor, TrialSplits, TrialState, save_model_atomically
from fer.train.fit_loop import fit_stage
from fer.train.stage_programs import compile_stage
from fer.train.warm import WORKER, TrialModel, trial_dtype_policy


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
    and, when that trial's model would be built the same, restore its initial state instead of
    building it again (fer/train/warm.py).

    Writes config.json, history.csv (after every epoch), model.keras (the best val_loss so far,
    before every report after which the trial may be stopped: `report_can_stop(epoch)`, default
    every epoch; always at the end), and at the end val_metrics.json; with `evaluate_test` also
    test_metrics.json and test_predictions.csv. The test split is not opened otherwise.
    """
    config = make_config(config)  # the trial's one validation (callers pass what they have)
    out_dir = Path(out_dir)
    splits = _set_up(config, study_data, out_dir)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(trial_dtype_policy(config))
    try:
        t0 = time.perf_counter()
        built = WORKER.model_for(config, splits.num_classes, reuse_model)
        build_s = time.perf_counter() - t0
        train_batches = _pixel_batches(splits, config)
        state = TrialState(
            out_dir, splits, config, train_batches.images_per_epoch, on_epoch, report_can_stop
        )
        run = _TrialRun(config, study_data, splits, built, state, train_batches)
        stages = _StageRecords()
        for stage in _stages(config):
            if stage.epochs > 0:
                _train_stage(run, stage, stages)
        val_metrics = _write_val_metrics(run, _best_model_val_probs(run))
        summary = _summary(run, val_metrics, stages, build_s)
        if evaluate_test:
            summary.update(evaluate_split(built.model, study_data, "test", config, out_dir))
        write_json(out_dir / SUMMARY_FILE, summary)
        return summary
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _set_up(config: dict, study_data, out_dir: Path) -> TrialSplits:
    """The trial folder with its config.json; the splits it trains on; the compilation cache."""
    from fer.runtime.backend import enable_compilation_cache

    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)
    splits = TrialSplits.load(study_data, config["image_size"])
    # JAX: later trials skip compiles
    enable_compilation_cache(Path(study_data.dir).parent / "compile_cache")
    return splits


def _pixel_batches(splits: TrialSplits, config: dict) -> PixelBatches:
    """The exact path's training batches: the train images, shuffled with the trial's seed."""
    return PixelBatches(
        splits.train_pixels,
        config["batch_size"],
        splits.train_labels,
        splits.num_classes,
        splits.class_weights,
        shuffle_seed=config["seed"],
        label_smoothing=config["label_smoothing"],
    )


@dataclasses.dataclass(frozen=True)
class _TrialRun:
    """The trial being run: what its steps share."""

    config: dict
    study_data: StudyData
    splits: TrialSplits
    built: TrialModel
    state: TrialState
    train_batches: PixelBatches

    @property
    def model(self) -> keras.Model:
        return self.built.model


@dataclasses.dataclass(frozen=True)
class _Stage:
    name: str
    epochs: int
    lr: float
    unfreeze: int  # backbone layers (or blocks) made trainable


def _stages(config: dict) -> tuple[_Stage, _Stage]:
    return (
        _Stage("head", config["epochs_head"], config["lr_head"], 0),
        _Stage(
            "finetune",
            config["epochs_finetune"],
            config["lr_finetune"],
            config["unfreeze_layers"],
        ),
    )


@dataclasses.dataclass
class _StageRecords:
    """What the summary records per stage that ran."""

    trainable_layers: dict = dataclasses.field(default_factory=dict)
    feature_cache: dict = dataclasses.field(default_factory=dict)
    compiled_stage_reused: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Fit:
    """What one stage fits: the model, its batches and its monitor (first callback)."""

    model: keras.Model
    batches: PixelBatches
    monitor: EpochMonitor


def _train_stage(run: _TrialRun, stage: _Stage, records: _StageRecords) -> None:
    """Make the stage's layers trainable, compile (or put back a kept compiled stage), fit."""
    config, model, programs = run.config, run.model, run.built.programs
    records.trainable_layers[stage.name] = set_stage(
        model,
        stage.name,
        stage.unfreeze,
        config["unfreeze_unit"],
        get_backbone(config["backbone"]),
        train_batchnorm=config["weights"] == "none",
    )
    if config[f"{stage.name}_features"] == "cached":
        fit, records.feature_cache[stage.name] = _cached_fit(run, stage.name)
    else:
        fit = _Fit(model, run.train_batches, EpochMonitor(run.state, stage.name))
    # Changing `trainable` only takes effect after compile (docs/pitfalls.md#recompile). A warm
    # worker's kept model puts back an earlier trial's compiled stage of the same trainable layers
    # instead (fer/train/stage_programs.py); a feature-cache stage fits a new model each trial and
    # compiles it.
    keeps_programs = fit.model is model and programs is not None
    if keeps_programs:
        records.compiled_stage_reused[stage.name] = programs.compile(model, stage.lr)
    else:
        compile_stage(fit.model, stage.lr)
    # fer/train/fit_loop.py: under TensorFlow a loop of train steps (no tf.data pipeline per
    # epoch), else `fit`; the same batches, order, callbacks and numbers
    fit_stage(fit.model, fit.batches, stage.epochs, _callbacks(fit.monitor, config["patience"]))
    if keeps_programs:
        programs.keep(model)


def _cached_fit(run: _TrialRun, stage: str) -> tuple[_Fit, dict]:
    """A stage on the study's frozen-feature cache (fer.train.feature_cache): a model made of the
    SAME trainable layers (the head; in stage 2 also the unfrozen tail) fitted on precomputed
    activations of the frozen part. Returns the fit and the cache's summary info."""
    from fer.train import feature_cache as fc

    config, splits = run.config, run.splits
    features, fit_model = fc.stage_features(
        run.model, stage, config, run.study_data, keras.config.dtype_policy().name
    )
    batches = FeatureViews(
        features.train,
        config["batch_size"],
        splits.train_labels,
        splits.num_classes,
        splits.class_weights,
        shuffle_seed=config["seed"],
        label_smoothing=config["label_smoothing"],
    )
    val_inputs = model_input(features.val)
    monitor = EpochMonitor(run.state, stage, val_inputs=val_inputs, full_model=run.model)
    return _Fit(fit_model, batches, monitor), features.info()


def _callbacks(monitor: EpochMonitor, patience: int) -> list[keras.callbacks.Callback]:
    return [
        monitor,  # first: it puts val_loss into the logs the others read
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=max(1, patience // 2), min_lr=1e-7
        ),
        # a diverged trial stops instead of burning its budget
        keras.callbacks.TerminateOnNaN(),
    ]


def _best_model_val_probs(run: _TrialRun) -> np.ndarray:
    """Put the trial's best weights into the model and make model.keras hold them; return what
    that model predicts for val."""
    state, model = run.state, run.model
    if state.best_weights is None:  # no epoch ran (both stages at 0 epochs): the untrained model
        save_model_atomically(model, state.out_dir / MODEL_FILE)
        return predict_probs(model, state.val_pixels, state.batch_size, tta_flip=state.tta_flip)
    model.set_weights(state.best_weights)
    state.save_best(model, at_best=True)
    return state.best_val_probs  # what this model predicted for val at its best epoch


def _write_val_metrics(run: _TrialRun, val_probs: np.ndarray) -> dict:
    """val_metrics.json: the classification metrics of the best model and its val_loss."""
    state = run.state
    val_metrics = classification_metrics(
        state.val_labels, val_probs, state.classes, seed=run.config["seed"]
    )
    val_metrics["val_loss"] = float(
        keras.ops.convert_to_numpy(state.loss_fn(state.val_onehot, val_probs))
    )
    write_json(state.out_dir / metrics_file("val"), val_metrics)
    return val_metrics


def _summary(run: _TrialRun, val_metrics: dict, stages: _StageRecords, build_s: float) -> dict:
    """summary.json: the best epoch's val metrics, timings, what was reused or cached."""
    state = run.state
    return {
        "best_epoch": state.best_record.get("epoch"),
        "best_stage": state.best_record.get("stage"),
        "val_loss": val_metrics["val_loss"],
        "val_accuracy": val_metrics["accuracy"]["value"],
        "val_macro_f1": val_metrics["macro_f1"]["value"],
        "epochs_run": state.global_epoch,
        "train_s": sum(sum(seconds) for seconds in state.train_s.values()),
        "images_per_s": _steady_images_per_s(state, state.train_s),
        "stage_images_per_s": {
            stage: _steady_images_per_s(state, {stage: seconds})
            for stage, seconds in state.train_s.items()
        },
        "first_step_s": state.first_batch_s,
        # robust to a busy machine: median seconds per training step, each epoch's first step
        # excluded
        "median_step_s": {stage: float(np.median(steps)) for stage, steps in state.step_s.items()},
        "build_s": build_s,
        # reuse_model: the previous trial's model, its initial state restored
        "model_reused": run.built.reused,
        # per stage: an earlier trial's compiled program put back
        "compiled_stage_reused": stages.compiled_stage_reused,
        "params": int(run.model.count_params()),
        "trainable_layers": stages.trainable_layers,
        "dtype_policy": keras.config.dtype_policy().name,
        # per stage with a cache (head_features / finetune_features = cached): key, views,
        # computed here?, seconds spent getting it, bytes
        "feature_cache": stages.feature_cache,
        # stages whose val outputs collapsed (uniform or one class), with the learning rate that
        # did it
        "collapsed_stages": state.collapse.write(state.stage_last_epoch),
    }


def _steady_images_per_s(state: TrialState, train_s: dict[str, list[float]]) -> float | None:
    """Training images/s of the given stages without each stage's first step (its graph
    compilation is a fixed start-up cost, reported separately as `first_step_s`)."""
    epochs = sum(len(seconds) for seconds in train_s.values())
    seconds = sum(sum(s) for s in train_s.values()) - sum(
        state.first_batch_s.get(stage, 0.0) for stage in train_s
    )
    images = state.n_train * epochs - min(state.batch_size, state.n_train) * len(train_s)
    return images / seconds if seconds > 0 and images > 0 else None
