"""Warm workers: a process that runs one trial after another (a warm study worker, `run`'s default;
benchmarks/compile_reuse.py) keeps its last model, and that model's compiled stages, between trials.

One `WarmWorker` per process (`WORKER`). Before each trial after the first, `fresh_keras_state`
drops what the earlier trial left in Keras' global state. With `run_trial(reuse_model=True)`, a
trial whose model would be built the same (`MODEL_KEYS`, the class count, the dtype policy, the
backend) gets the kept model back in its initial state instead of a new build; the trial then
repeats a freshly built one number for number (tests/test_compile_reuse.py, tests/test_reuse.py).
Its `StagePrograms` (fer/train/stage_programs.py) puts back the compiled stages an earlier trial
traced for the same trainable layers.

TensorFlow's kernel cache must survive between such trials: `clear_session` and
`tf.random.set_seed` both empty it, after which every put-back compiled stage re-optimizes its
program at its first step (docs/pitfalls.md#kernel-cache). So neither runs while a model is kept:
the session is cleared only when another model is built.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
from pathlib import Path

import keras
import numpy as np

from fer.model.backbones import get_backbone
from fer.model.build import build_model, set_stage
from fer.train.stage_programs import StagePrograms

# what build_model's result depends on (dropout is a HeadDropout variable, set per trial)
MODEL_KEYS = ("backbone", "image_size", "weights", "dense_units", "augment", "seed", "bn_epsilon")


def trial_dtype_policy(config: dict) -> str:
    """The Keras dtype policy a trial runs under (`mixed_precision`: off, auto, or a dtype)."""
    mode = config["mixed_precision"]
    if mode == "off":
        return "float32"
    if mode == "auto":
        from fer.runtime.backend import mixed_precision_dtype

        # bfloat16 on compute capability >= 8, float16 below, None on CPU
        dtype = mixed_precision_dtype()
        return f"mixed_{dtype}" if dtype else "float32"
    return f"mixed_{mode}"


@dataclasses.dataclass(frozen=True)
class TrialModel:
    """The model a trial trains: `reused` when it is the kept model of an earlier trial, its
    initial state restored; `programs` its kept compiled stages (None without reuse)."""

    model: keras.Model
    reused: bool
    programs: StagePrograms | None


@dataclasses.dataclass(frozen=True)
class _KeptModel:
    """The model a warm worker keeps, with everything needed to put it back as just built."""

    key: str
    model: keras.Model
    initial: list  # (variable, its value right after the build) for every variable
    python_random: tuple
    numpy_random: tuple
    programs: StagePrograms


class WarmWorker:
    """What one process keeps between its trials: at most one model (`kept`)."""

    def __init__(self) -> None:
        self.kept: _KeptModel | None = None

    def fresh_keras_state(self) -> None:
        """Drop everything an earlier trial left in Keras' global state: models, layer-name
        counters, the default dtype policy, and TensorFlow's registrations that keep every traced
        train step alive (`fer.runtime.backend.release_traced_graphs`). The trial's seeds are set
        by build_model (keras.utils.set_random_seed) or, for a kept model, restored by
        `model_for`.

        While a model is kept the session stays (see the module docstring): `model_for` clears it
        when it builds another model. One garbage collection, not clear_session's own as well:
        each is slow with a kept model."""
        from fer.runtime.backend import release_traced_graphs

        if self.kept is None:
            keras.backend.clear_session(free_memory=False)
        keras.config.set_dtype_policy("float32")
        # else TensorFlow keeps every traced train step (docs/pitfalls.md#custom-gradient-leak)
        release_traced_graphs()
        gc.collect()

    def model_for(self, config: dict, num_classes: int, reuse: bool) -> TrialModel:
        """`build_model`, or with `reuse` the kept model when it would be built the same, put back
        as just built (`_restore`). With `reuse` a newly built model is kept for the next trial.
        Saves the build (a large backbone, a weights file to load) and, with the model's
        `StagePrograms`, the tracing of each stage an earlier trial trained."""
        if not reuse:
            self.drop()
            return TrialModel(build_model(config, num_classes), reused=False, programs=None)
        key = _model_key(config, num_classes)
        if self.kept is not None and self.kept.key == key:
            return TrialModel(self._restore(config), reused=True, programs=self.kept.programs)
        self.drop()
        model = build_model(config, num_classes)
        self.kept = _KeptModel(
            key=key,
            model=model,
            initial=[(v, np.array(keras.ops.convert_to_numpy(v))) for v in model.variables],
            python_random=random.getstate(),
            numpy_random=np.random.get_state(),
            programs=StagePrograms(),
        )
        return TrialModel(model, reused=False, programs=self.kept.programs)

    def _restore(self, config: dict) -> keras.Model:
        """The kept model as right after its build: every variable (weights, BatchNormalization
        statistics, the seed states of the dropout and augmentation layers) and Python's and
        NumPy's random states back, this trial's dropout rate set, the backbone frozen again."""
        kept = self.kept
        for variable, value in kept.initial:
            variable.assign(value)
        # Not keras.utils.set_random_seed: every random op of the model draws from its layers'
        # seed-generator variables (just restored), Python's and NumPy's states are put back below,
        # and the session (Keras's global seed) was kept; TensorFlow's tf.random.set_seed would
        # also empty the kernel cache (see the module docstring).
        random.setstate(kept.python_random)
        np.random.set_state(kept.numpy_random)
        kept.model.get_layer("head_dropout").set_rate(config["dropout"])
        set_stage(kept.model, "head", 0, config["unfreeze_unit"], get_backbone(config["backbone"]))
        return kept.model

    def drop(self) -> None:
        """Another model replaces the kept one: clear the Keras session fresh_keras_state left for
        it (the trial's dtype policy, already set, stays)."""
        if self.kept is not None:
            self.kept = None
            policy = keras.config.dtype_policy()
            keras.backend.clear_session()
            keras.config.set_dtype_policy(policy)


# the process's one warm worker
WORKER = WarmWorker()


def fresh_keras_state() -> None:
    """Before a trial in a process that already ran one: `WORKER.fresh_keras_state()`.
    tests/test_reuse.py checks that a trial in a reused worker, after a trial that raised and one
    with a NaN loss, repeats a fresh process's epochs number for number."""
    WORKER.fresh_keras_state()


def _model_key(config: dict, num_classes: int) -> str:
    """Everything the built model depends on: equal keys, the same model."""
    fields = {key: config.get(key) for key in MODEL_KEYS}
    if config["weights"] not in ("none", "imagenet"):
        # a weights file: its content counts, not only its path
        path = Path(config["weights"]).expanduser()
        stat = path.stat() if path.is_file() else None
        fields["weights_file"] = (stat.st_size, stat.st_mtime_ns) if stat else None
    fields.update(
        num_classes=num_classes,
        policy=keras.config.dtype_policy().name,
        backend=keras.backend.backend(),
    )
    return json.dumps(fields, sort_keys=True, default=str)
