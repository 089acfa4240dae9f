"""Issue 12: a warm worker puts back an earlier trial's compiled stage (fer/train/stage_programs.py)
instead of compiling again, and the trial still repeats a fresh one number for number, also after a
trial whose optimizer state went NaN, one that raised in the middle of a stage, and one of another
unfreeze depth."""

from __future__ import annotations

import json

import keras
import pandas as pd
import pytest

from fer.train.trial import run_trial
from fer.train.warm import WORKER, fresh_keras_state

COMPARED = ["loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr"]
TINY = dict(
    backbone="smallcnn", image_size=48, weights="none", batch_size=16, dense_units=16, augment=0.0
)
A = dict(
    TINY,
    epochs_head=2,
    epochs_finetune=2,
    unfreeze_layers=4,
    dropout=0.3,
    label_smoothing=0.1,
    patience=5,
)


def _history(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "history.csv")[COMPARED]


def _raise_in_finetune(record: dict) -> None:
    if record["stage"] == "finetune":
        raise RuntimeError("a failure in the middle of stage 2")


def test_a_warm_trial_after_nan_failed_and_other_depth_trials_repeats_a_fresh_one(
    prepared_data, tmp_path
):
    fresh_keras_state()
    fresh = run_trial(A, prepared_data, tmp_path / "fresh")  # a fresh process's trial: nothing kept
    assert fresh["compiled_stage_reused"] == {}

    fresh_keras_state()
    first = run_trial(dict(A, lr_head=3e-3), prepared_data, tmp_path / "first", reuse_model=True)
    assert first["compiled_stage_reused"] == {"head": False, "finetune": False}
    # as a diverged trial leaves them: every kept optimizer's step count and moments NaN
    for kept in WORKER.kept.programs._kept.values():
        for variable in kept["optimizer"].variables:
            variable.assign(keras.ops.full(variable.shape, float("nan"), variable.dtype))
    fresh_keras_state()  # another unfreeze depth: the head stage is put back, stage 2 compiled anew
    other = run_trial(
        dict(A, unfreeze_layers=2, dropout=0.6), prepared_data, tmp_path / "other", reuse_model=True
    )
    assert other["compiled_stage_reused"] == {"head": True, "finetune": False}
    fresh_keras_state()
    with pytest.raises(RuntimeError, match="middle of stage 2"):
        run_trial(
            A, prepared_data, tmp_path / "raised", on_epoch=_raise_in_finetune, reuse_model=True
        )

    fresh_keras_state()
    again = run_trial(A, prepared_data, tmp_path / "again", reuse_model=True)
    assert again["model_reused"] and again["compiled_stage_reused"] == {
        "head": True,
        "finetune": True,
    }
    pd.testing.assert_frame_equal(
        _history(tmp_path / "fresh"), _history(tmp_path / "again"), atol=1e-6, rtol=0
    )
    model = WORKER.kept.model
    assert [m.name for m in model.metrics] == [
        "loss",
        "compile_metrics",
    ]  # no tracker added per put-back


def test_a_warm_worker_keeps_few_compiled_stages(prepared_data, tmp_path):
    """Each kept stage holds its traced graphs: a search over unfreeze depths must not keep one per
    trial."""
    for depth in (1, 2, 3, 4, 5):
        fresh_keras_state()
        run_trial(
            dict(A, epochs_head=1, epochs_finetune=1, unfreeze_layers=depth),
            prepared_data,
            tmp_path / str(depth),
            reuse_model=True,
        )
    programs = WORKER.kept.programs
    assert len(programs) == programs.limit == 3
    fresh_keras_state()
    again = run_trial(
        dict(A, epochs_head=1, epochs_finetune=1, unfreeze_layers=5),
        prepared_data,
        tmp_path / "5b",
        reuse_model=True,
    )
    assert again["compiled_stage_reused"] == {
        "head": True,
        "finetune": True,
    }  # the latest ones stay


_JAX_WARM = r"""
import json, sys
from pathlib import Path
from fer.data import StudyData
from fer.train.trial import run_trial
from fer.train.warm import fresh_keras_state
import pandas as pd

data, out, config = StudyData(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
fresh = run_trial(config, data, out / "fresh")
fresh_keras_state()
run_trial({**config, "dropout": 0.6, "lr_head": 3e-3}, data, out / "first", reuse_model=True)
fresh_keras_state()
again = run_trial(config, data, out / "again", reuse_model=True)
a, b = (pd.read_csv(out / name / "history.csv") for name in ("fresh", "again"))
cols = ["loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr"]
max_diff = float((a[cols] - b[cols]).abs().max().max())
print(json.dumps({"reused": again["compiled_stage_reused"], "max_diff": max_diff}))
"""


@pytest.mark.slow
def test_under_jax_a_put_back_stage_repeats_a_fresh_trial(prepared_data, tmp_path, run_under_jax):
    lines = run_under_jax(
        _JAX_WARM, prepared_data.dir, tmp_path, json.dumps(A), JAX_PLATFORMS="cpu"
    )
    assert lines[-1]["reused"] == {"head": True, "finetune": True}, lines
    assert lines[-1]["max_diff"] <= 1e-6, lines


def test_stage_programs_keep_only_a_plain_adam():
    """A loss-scale optimizer (mixed_float16) starts with a non-zero scale: not reset as zeros, so
    not kept."""
    from fer.train.stage_programs import StagePrograms, compile_stage

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    programs = StagePrograms()
    compile_stage(model, 1e-3)
    programs.keep(model)  # compiled but never fitted: no traced program to keep
    assert len(programs) == 0
    model.fit(keras.ops.ones((4, 4)), keras.ops.one_hot(keras.ops.zeros(4, "int32"), 2), verbose=0)
    programs.keep(model)
    assert len(programs) == 1
    model.optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3))
    programs = StagePrograms()
    programs.keep(model)
    assert len(programs) == 0
