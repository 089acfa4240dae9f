"""Collapsed stages (fer/train/collapse.py): detected from the val predictions, recorded, warned
about."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest

from fer.data import StudyData
from fer.train.collapse import collapse_reason, read_collapsed_epochs
from fer.train.trial import run_trial
from study.report.verdict import stage_problems


def test_collapse_reason_on_hand_made_predictions():
    rng = np.random.default_rng(0)
    uniform = np.full((50, 5), 0.2) + rng.normal(0, 0.001, (50, 5))
    assert collapse_reason(uniform, 5).startswith("uniform outputs")
    one = np.tile([0.1, 0.6, 0.1, 0.1, 0.1], (50, 1))
    assert "100% of val images are 'b'" in collapse_reason(one, 5, list("abcde"))
    healthy = np.eye(5)[rng.integers(0, 5, 50)] * 0.8 + 0.04
    assert collapse_reason(healthy, 5) is None
    assert collapse_reason(np.zeros((0, 5)), 5) is None


@pytest.fixture(scope="module")
def trial_data(prepared_data) -> StudyData:
    return prepared_data if isinstance(prepared_data, StudyData) else StudyData(prepared_data)


def test_a_stage_wrecked_by_its_learning_rate_is_recorded_and_logged(trial_data, tmp_path, caplog):
    """lr_finetune 1.0 wrecks smallcnn in its first fine-tune epoch (97% of val faces called one
    class; with BatchNormalization it partly recovers in a second epoch, so the stage runs one): the
    trial says so (summary.json, collapse.json, a warning naming the learning rate) instead of
    silently keeping the head-stage model."""
    config = {
        "backbone": "smallcnn",
        "image_size": 32,
        "weights": "none",
        "dense_units": 16,
        "batch_size": 16,
        "epochs_head": 1,
        "epochs_finetune": 1,
        "patience": 5,
        "augment": 0.0,
        "unfreeze_layers": 200,
        "lr_head": 1e-3,
        "lr_finetune": 1.0,
    }
    with caplog.at_level(logging.WARNING, logger="fer.train.collapse"):
        summary = run_trial(config, trial_data, tmp_path)
    stages = {s["stage"]: s for s in summary["collapsed_stages"]}
    assert stages["finetune"]["ended_collapsed"] and stages["finetune"]["lr_finetune"] == 1.0
    assert stages["finetune"]["collapsed_epochs"] == [2]
    assert math.isclose(stages["finetune"]["ln_k"], math.log(len(trial_data.classes)))
    assert (
        json.loads((tmp_path / "collapse.json").read_text())["collapsed_stages"]
        == summary["collapsed_stages"]
    )
    assert any(
        "finetune stage collapsed" in r.getMessage() and "lr_finetune=1.0" in r.getMessage()
        for r in caplog.records
    )
    # the report's verdict flags the same stage from the same record (one definition,
    # fer.train.collapse)
    history = pd.read_csv(tmp_path / "history.csv")
    problems = stage_problems(history, len(trial_data.classes), read_collapsed_epochs(tmp_path))
    assert [(p["kind"], p["stage"], p["epoch"]) for p in problems] == [("collapsed", "finetune", 2)]
    # a learning trial ends with no collapsed stage: see
    # test_trial.py::test_smallcnn_learns_from_scratch...
