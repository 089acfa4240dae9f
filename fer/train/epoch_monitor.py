"""What a trial does after every epoch, whichever stage: validate, keep the best weights, write
history.csv and model.keras, check for collapse, report. `TrialState` is what the stages share.

Honest evaluation: validation is computed once per epoch from the model's own predictions
(val_loss, val_accuracy and val_macro_f1 from the same pass).

Test-time mirroring (`tta_flip: 1`) applies to this per-epoch validation too, not only to the final
val and test evaluations: these records pick the trial's best epoch (val_loss) and the study's best
trial (the space's metric, e.g. val_accuracy), so judging them on single images while the test split
sees mirrored averages would select one predictor and report another. It is cheap: one more
forward pass over val per epoch, no backward pass, in the same compiled predict step (the mirrored
batch has the same shape); val is about a ninth of the train split on FER2013, so the epoch costs a
few percent more. The cached-feature stages cannot mirror (their val inputs are features of
unmirrored images), so the config refuses tta_flip with them (fer.core.config.check_rules).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from fer.core.errors import UserError
from fer.core.names import HISTORY_FILE, MODEL_FILE, RECORD_KEYS
from fer.data.batches import predict_probs
from fer.evaluate.metrics import macro_f1
from fer.train.collapse import CollapseLog


def save_model_atomically(model: keras.Model, path: Path) -> None:
    """Write `path` via a temporary file and a rename, so a trial killed mid-save never leaves a
    torn model."""
    partial = path.with_name(path.stem + ".partial.keras")  # Keras insists on the .keras extension
    model.save(partial)
    os.replace(partial, path)


@dataclasses.dataclass(frozen=True)
class TrialSplits:
    """The labelled images one trial trains and validates on (memory-mapped uint8 pixels)."""

    classes: list[str]
    train_pixels: np.ndarray
    train_labels: np.ndarray
    val_pixels: np.ndarray
    val_labels: np.ndarray
    class_weights: dict[int, float]  # the training loss's per-class weights

    @classmethod
    def load(cls, study_data, image_size: int) -> TrialSplits:
        """The train and val splits at `image_size`; a trial needs images in both."""
        splits = cls(
            list(study_data.classes),
            study_data.pixels("train", image_size),
            study_data.labels("train"),
            study_data.pixels("val", image_size),
            study_data.labels("val"),
            study_data.class_weights,
        )
        n_train, n_val = len(splits.train_labels), len(splits.val_labels)
        if n_train == 0 or n_val == 0:
            raise UserError(
                f"the study data has {n_train} train and {n_val} val images; a trial needs both"
            )
        return splits

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TrialState:
    """What the stages share: validation data, the running history and the best model so far."""

    def __init__(
        self,
        out_dir: Path,
        splits: TrialSplits,
        config: dict,
        n_train: int,
        on_epoch: Callable[[dict], None] | None,
        report_can_stop: Callable[[int], bool] | None = None,
    ):
        self.out_dir, self.classes = out_dir, splits.classes
        self.val_pixels, self.val_labels = splits.val_pixels, splits.val_labels
        self.num_classes, self.batch_size = splits.num_classes, config["batch_size"]
        self.tta_flip = bool(config["tta_flip"])  # every val prediction averages the mirror
        self.n_train = n_train  # images trained per epoch
        self.val_onehot = np.eye(self.num_classes, dtype=np.float32)[self.val_labels]
        # val_loss (computed eagerly, outside the compiled steps) with the trial's label smoothing
        self.loss_fn = keras.losses.CategoricalCrossentropy(
            label_smoothing=config["label_smoothing"]
        )
        self.on_epoch = on_epoch
        self.report_can_stop = report_can_stop or (lambda epoch: True)
        self.global_epoch = 0
        self.history: list[dict] = []
        self.best_record: dict = {}
        self.best_weights = None
        # val predictions of the best epoch (the final val metrics reuse them)
        self.best_val_probs = None
        self.saved_epoch = None  # the epoch whose weights model.keras holds
        self.train_s: dict[str, list[float]] = {}  # per stage: training seconds of each epoch
        self.first_batch_s: dict[str, float] = {}
        self.step_s: dict[str, list[float]] = {}  # per stage: seconds between batch ends
        self.stage_last_epoch: dict[str, int] = {}
        self.collapse = CollapseLog(out_dir, config, self.num_classes)

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


class EpochMonitor(keras.callbacks.Callback):
    """Validates after every epoch, keeps the best weights, saves the best model, reports the
    record.

    It must run first among the callbacks: it writes val_loss into the epoch logs that
    EarlyStopping and ReduceLROnPlateau then read. The best model (lowest val_loss over the whole
    trial) is saved to `model.keras` BEFORE `on_epoch` is called whenever that report may be the
    trial's last (every report by default; in a study, the scheduler's decision epochs:
    `report_can_stop`), so a scheduler that stops the trial right after a report still leaves the
    best model on disk (docs/pitfalls.md#last-report). Saving only there, and once at the end,
    spares a model write per improving epoch.

    With a frozen-feature cache (`head_features` / `finetune_features` = cached) the fitted model
    is a head-only or tail model sharing its layers with the full model: `val_inputs` are then the
    cached val inputs and `full_model` is what is saved and remembered as the trial's best.
    """

    def __init__(
        self, trial: TrialState, stage: str, val_inputs=None, full_model: keras.Model | None = None
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
        if batch == 0 and self.first_batch_s is None:
            # the stage's first step: includes graph compilation
            self.first_batch_s = now - self.epoch_start
        if batch > 0:  # end-to-end interval: the step plus all input and callback work around it
            self.trial.step_s.setdefault(self.stage, []).append(now - self.last_batch_end)
        self.last_batch_end = now

    def on_epoch_end(self, epoch, logs=None):
        t = self.trial
        train_s = time.perf_counter() - self.epoch_start
        record, probs = self._validate(logs, train_s)
        t.train_s.setdefault(self.stage, []).append(train_s)
        if self.first_batch_s is not None and t.first_batch_s.get(self.stage) is None:
            t.first_batch_s[self.stage] = self.first_batch_s
        self._keep_if_best(record, probs)
        if t.report_can_stop(t.global_epoch):
            t.save_best(self.full_model or self.model)
        t.history.append(record)
        t.write_history()
        t.stage_last_epoch[self.stage] = t.global_epoch
        # fer/train/collapse.py: collapse.json, at once
        t.collapse.check(self.stage, record, probs, t.classes)
        if t.on_epoch is not None:
            t.on_epoch(dict(record))

    def _validate(self, logs: dict, train_s: float) -> tuple[dict, np.ndarray]:
        """The epoch's record (RECORD_KEYS) and val probabilities; val_loss and val_accuracy also
        go into `logs` for the callbacks after this one."""
        t = self.trial
        inputs = t.val_pixels if self.val_inputs is None else self.val_inputs
        probs = predict_probs(self.model, inputs, t.batch_size, tta_flip=t.tta_flip)
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
        return record, probs

    def _keep_if_best(self, record: dict, probs: np.ndarray) -> None:
        """Remember the stage's best weights and, when this epoch is the trial's best so far, its
        record, val predictions and the full model's weights."""
        t, val_loss = self.trial, record["val_loss"]
        if not (math.isfinite(val_loss) and val_loss < self.stage_best_loss):
            return
        self.stage_best_loss = val_loss
        self.stage_best_weights = self.model.get_weights()
        if val_loss < t.best_record.get("val_loss", math.inf):
            full = self.full_model or self.model
            t.best_record, t.best_val_probs = record, probs
            t.best_weights = self.stage_best_weights if full is self.model else full.get_weights()

    def on_train_end(self, logs=None):
        self.trial.collapse.stage_ended(self.stage, self.trial.stage_last_epoch.get(self.stage))
        if self.stage_best_weights is not None:  # restore the stage's best-val-loss weights
            self.model.set_weights(self.stage_best_weights)
