"""A warm worker's compiled stages: each training stage's traced train/val/predict programs, kept
with the model between trials and reused when the next trial trains the same variables.

Why: `model.compile()` throws away the traced programs (Keras sets `train_function` and friends to
None), so every trial traced its two stages again: most of a later trial's fixed cost in a warm
worker (docs/benchmarks.md, study overhead). A stage's program depends only on which layers are
trainable (what is differentiated, which BatchNormalization layers run in training mode) and on the
model's variables; the learning rate is an optimizer variable, the dropout rate a
`fer.model.layers.HeadDropout` variable and label smoothing is in the targets
(docs/pitfalls.md#baked-constants). So when a stage trains the same layers as a stage of an earlier
trial of this process on the SAME model object (`fer.train.warm.WarmWorker.model_for` restored its
initial state), that stage's compile state (optimizer, loss and metric objects, traced programs) is
put back instead of compiling anew, and the optimizer's variables are reset to a fresh Adam's (zero
moments and step count, the trial's learning rate). The trial then repeats a freshly compiled one
number for number (tests/test_stage_programs.py). Under JAX this also skips the retrace; the
persistent compilation cache already skipped the XLA compile.
"""

from __future__ import annotations

import keras

# What `Model.compile` sets (keras/src/trainers/trainer.py, Keras 3.x): all of it is swapped
# together, since a traced program holds the very optimizer, loss and metric objects it was traced
# with.
COMPILE_STATE = (
    "optimizer",
    "loss",
    "_compile_loss",
    "_compile_metrics",
    "_loss_tracker",
    "_compiled_trainable_state",
    "_compile_config",
    "compiled",
    "jit_compile",
    "run_eagerly",
    "steps_per_execution",
    "train_function",
    "test_function",
    "predict_function",
)


def trainable_signature(model: keras.Model) -> tuple[bool, ...]:
    """Which layers are trainable, in the model's layer order: what a stage's program depends on."""
    return tuple(layer.trainable for layer in model._flatten_layers())


class StagePrograms:
    """The compile states of one model's stages, by trainable signature. Belongs to one model
    object.

    At most `limit` are kept, the least recently used dropped first: each holds its traced graphs
    (large), and a search over `unfreeze_layers` gives every trial a new stage-2
    signature, so an unbounded cache would grow a warm worker by one graph per trial
    (benchmarks/worker_memory.py). Three keep the head stage and two unfreeze depths."""

    def __init__(self, limit: int = 3) -> None:
        from collections import OrderedDict

        self.limit = limit
        self._kept: OrderedDict[tuple[bool, ...], dict] = OrderedDict()

    def compile(self, model: keras.Model, learning_rate: float) -> bool:
        """Compile `model` for a stage (Adam at `learning_rate`, categorical cross-entropy on the
        batches' targets, accuracy), reusing a kept compile state of the same trainable layers.
        Returns True if reused."""
        signature = trainable_signature(model)
        kept = self._kept.get(signature)
        if kept is None:
            compile_stage(model, learning_rate)
            return False
        from keras.src.utils.tracking import (
            DotNotTrackScope,
        )  # what Model.compile assigns under, too

        with DotNotTrackScope():  # else each put-back loss tracker is added to model._metrics again
            for name, value in kept.items():
                setattr(model, name, value)
        optimizer = model.optimizer
        for variable in optimizer.variables:  # a fresh Adam: step count and moments zero ...
            variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
        optimizer.learning_rate = learning_rate  # ... and the trial's learning rate
        model.reset_metrics()
        model.stop_training = False
        self._kept.move_to_end(signature)
        return True

    def keep(self, model: keras.Model) -> None:
        """After a stage's fit: keep its compile state for a later stage that trains the same
        layers. Only a plain Adam is kept (its fresh state is all zeros; a loss-scale optimizer's is
        not)."""
        if type(model.optimizer) is keras.optimizers.Adam and model.train_function is not None:
            signature = trainable_signature(model)
            self._kept[signature] = {name: getattr(model, name) for name in COMPILE_STATE}
            self._kept.move_to_end(signature)
            while len(self._kept) > self.limit:
                self._kept.popitem(last=False)

    def __len__(self) -> int:
        return len(self._kept)


def compile_stage(model: keras.Model, learning_rate: float) -> None:
    """The one compile every stage uses. The loss has no smoothing constant: the batches carry
    smoothed targets (fer.data.batches.smooth_targets), so trials that differ in label smoothing
    compile the same program."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
