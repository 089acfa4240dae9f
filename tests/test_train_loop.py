"""fer.train.fit_loop: under TensorFlow a stage's epochs run as a loop of train steps over our
batches (no tf.data pipeline per epoch); it must be Keras's `fit`, number for number: the same
batches in the same order, the same callbacks with the same logs, the same weights."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pandas as pd
import pytest

from fer.data.batches import PixelBatches
from fer.train import trial as trial_module
from fer.train.fit_loop import fit_stage
from fer.train.stage_programs import compile_stage
from fer.train.trial import run_trial

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the loop is TensorFlow's (JAX keeps fit)"
)


class _Scripted(keras.callbacks.Callback):
    """First callback: a scripted val_loss (so ReduceLROnPlateau and EarlyStopping act at known
    epochs) and a record of every batch's and epoch's logs and learning rate."""

    def __init__(self, val_losses):
        super().__init__()
        self.val_losses, self.seen = val_losses, []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(("batch", batch, dict(logs)))

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self.val_losses[epoch]
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.seen.append(("epoch", epoch, dict(logs), lr))


def _model() -> keras.Model:
    keras.utils.set_random_seed(7)
    inputs = keras.Input((12, 12, 1), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.3, seed=3)(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def _train(loop: bool):
    """Two stages on one batches object (as a trial's two stages): the first stopped early by
    EarlyStopping after a learning-rate cut, the second run to its end."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (70, 12, 12, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 70)
    batches = PixelBatches(pixels, 16, labels, 3, {0: 1.5, 1: 1.0, 2: 0.5}, 11, 0.1)
    model, seen = _model(), []
    for lr, val_losses in ((0.01, [1.0, 0.9, 0.95, 0.97, 0.99, 0.8]), (0.003, [0.5, 0.4, 0.3])):
        compile_stage(model, lr)
        scripted = _Scripted(val_losses)
        callbacks = [
            scripted,
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=2),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1),
            keras.callbacks.TerminateOnNaN(),
        ]
        fit_stage(model, batches, len(val_losses), callbacks, loop=loop)
        seen.append((scripted.seen, dict(model.history.history)))
    return seen, model.get_weights(), batches.order.copy()


def _assert_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y)
    elif isinstance(a, str):
        assert a == b
    else:
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=0, atol=1e-6)


def test_loop_is_fit_number_for_number():
    loop_seen, loop_weights, loop_order = _train(loop=True)
    fit_seen, fit_weights, fit_order = _train(loop=False)
    stage1_epochs = [s for s in loop_seen[0][0] if s[0] == "epoch"]
    assert len(stage1_epochs) == 4  # EarlyStopping stopped stage 1 after 4 of 6 epochs
    assert stage1_epochs[3][3] == pytest.approx(0.005)  # ReduceLROnPlateau halved it after epoch 3
    _assert_close(loop_seen, fit_seen)  # every batch's and epoch's logs, lr, history
    np.testing.assert_array_equal(loop_order, fit_order)  # the same reshuffles
    _assert_close(loop_weights, fit_weights)


@pytest.mark.slow
def test_trial_with_the_loop_is_the_trial_with_fit(prepared_data, tmp_path, monkeypatch):
    """A whole trial (both stages, our EpochMonitor, early stopping) the new way and with `fit`."""
    config = dict(
        backbone="smallcnn",
        weights="none",
        image_size=48,
        epochs_head=3,
        epochs_finetune=2,
        batch_size=16,
        patience=1,
        label_smoothing=0.1,
    )
    loop_summary = run_trial(config, prepared_data, tmp_path / "loop")
    monkeypatch.setattr(trial_module, "fit_stage", functools.partial(fit_stage, loop=False))
    fit_summary = run_trial(config, prepared_data, tmp_path / "fit")
    timing = ["epoch_s", "images_per_s"]
    loop_history = pd.read_csv(tmp_path / "loop" / "history.csv").drop(columns=timing)
    fit_history = pd.read_csv(tmp_path / "fit" / "history.csv").drop(columns=timing)
    pd.testing.assert_frame_equal(loop_history, fit_history, rtol=0, atol=1e-6)
    assert loop_summary["val_loss"] == pytest.approx(fit_summary["val_loss"], abs=1e-6)
    loop_model = keras.saving.load_model(tmp_path / "loop" / "model.keras")
    fit_model = keras.saving.load_model(tmp_path / "fit" / "model.keras")
    _assert_close(loop_model.get_weights(), fit_model.get_weights())
