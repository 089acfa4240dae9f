"""One training stage's epochs: Keras `fit`, or under TensorFlow the same epochs as a plain loop of
train steps over our batches (no per-epoch tf.data pipeline; fer.runtime.backend.batch_train_step).

The loop repeats what Keras 3's `fit` does around its steps, so the batches, their order, the
callbacks and the numbers are the same (tests/test_train_loop.py compares histories and weights
with `fit`): one reshuffle of the batches before the first epoch and one after every epoch whose
batches all ran; metrics reset per epoch; every callback (EarlyStopping, ReduceLROnPlateau, our
EpochMonitor, ...) called at the same points with the same logs, through a `CallbackList` that also
records the model's `history`.
"""

from __future__ import annotations

import keras

from fer.data.batches import PixelBatches
from fer.runtime.backend import batch_train_step


def fit_stage(
    model: keras.Model,
    batches: PixelBatches,
    epochs: int,
    callbacks: list[keras.callbacks.Callback],
    loop: bool | None = None,
) -> None:
    """Train `model` for up to `epochs` epochs on `batches` with `callbacks`. `loop`: force the
    plain loop (True, TensorFlow only) or `fit` (False); default: the loop where the backend has
    one."""
    step = batch_train_step(model) if loop is not False else None
    if loop and step is None:
        raise ValueError(f"no batch loop under the {keras.backend.backend()} backend")
    if step is None:
        # shuffle=False (docs/pitfalls.md#keras-shuffle): the batches shuffle themselves
        model.fit(batches, epochs=epochs, callbacks=callbacks, verbose=0, shuffle=False)
        return
    _loop(model, batches, epochs, callbacks, step)


def _loop(model, batches: PixelBatches, epochs: int, callbacks, step) -> None:
    """Keras 3's `fit` (keras/src/backend/tensorflow/trainer.py) with our batches fed one by one."""
    batches.on_epoch_end()  # fit's epoch iterator starts with a reset, which reshuffles
    callback_list = keras.callbacks.CallbackList(
        callbacks, add_history=True, epochs=epochs, steps=len(batches), model=model
    )
    model.stop_training = False
    callback_list.on_train_begin()
    training_logs, logs = None, {}
    for epoch in range(epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        completed = True
        for index in range(len(batches)):
            callback_list.on_train_batch_begin(index)
            logs = step(batches[index])
            callback_list.on_train_batch_end(index, logs)
            if model.stop_training:  # fit breaks out before its iterator reaches the epoch's end
                completed = False
                break
        if completed:  # fit's epoch iterator reshuffles when an epoch's batches ran out
            batches.on_epoch_end()
        epoch_logs = dict(model._get_metrics_result_or_logs(logs))
        callback_list.on_epoch_end(epoch, epoch_logs)
        training_logs = epoch_logs
        if model.stop_training:
            break
    if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
        model.optimizer.finalize_variable_values(model.trainable_weights)
    callback_list.on_train_end(logs=training_logs)
