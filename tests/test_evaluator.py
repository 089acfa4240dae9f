"""The study's Evaluator (study.tune.evaluator): what it prepares while the last trials run, and
that a warm evaluation writes the same results as a cold one. Runs the class in this process (no Ray
needed: the actor is this class with a trial's resources)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fer.train.trial import run_trial
from study.tune.evaluator import EvaluationJob, Evaluator, evaluate_best

TINY = dict(
    backbone="smallcnn", image_size=48, weights="none", batch_size=16, dense_units=16, augment=0.0
)
SELECTION = {
    "trial_id": "t",
    "metric": "val_loss",
    "mode": "min",
    "metric_value": 1.0,
    "status": "completed",
}


def _job(trial_dir, best_dir, prepared_data) -> EvaluationJob:
    return EvaluationJob(str(trial_dir), str(best_dir), str(prepared_data.dir), 1, SELECTION)


@pytest.fixture(scope="module")
def two_trials(prepared_data, tmp_path_factory):
    """Two finished tiny trials of the same architecture (different dropout and seed)."""
    root = tmp_path_factory.mktemp("evaluator")
    for name, dropout, seed in (("a", 0.2, 0), ("b", 0.5, 1)):
        config = dict(
            TINY, epochs_head=1, epochs_finetune=1, unfreeze_layers=2, dropout=dropout, seed=seed
        )
        run_trial(config, prepared_data, root / name)
    return root


def test_a_preloaded_trial_is_evaluated_with_the_latency_measured_while_the_search_ran(
    two_trials, prepared_data, tmp_path
):
    """preload() takes the deployment figures (blank images, no test data); evaluate() of the same
    trial writes exactly those figures and the same test results as a cold evaluation in a new
    folder."""
    evaluator = Evaluator(threads=1)
    assert evaluator.preload(str(two_trials / "a"))
    measured = evaluator.preloaded.latency
    assert measured["devices"]["cpu"]["runs"] >= 50 and measured["params"] > 0
    assert not (
        two_trials / "a" / "test_metrics.json"
    ).exists()  # preloading never touched the test split
    warm = evaluator.evaluate(_job(two_trials / "a", tmp_path / "warm", prepared_data))
    assert json.loads((tmp_path / "warm" / "latency.json").read_text()) == measured
    cold = evaluate_best(_job(two_trials / "a", tmp_path / "cold", prepared_data))
    assert warm["test_accuracy"] == cold["test_accuracy"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "warm" / "test_predictions.csv"),
        pd.read_csv(tmp_path / "cold" / "test_predictions.csv"),
    )
    cold_latency = json.loads((tmp_path / "cold" / "latency.json").read_text())
    assert cold_latency["measured_at"] > measured["measured_at"]  # the cold one timed its own


def test_another_trial_than_the_preloaded_one_is_loaded_and_timed_afresh(
    two_trials, prepared_data, tmp_path
):
    """The search's best changed after the preload (the last trial won): the evaluation must not
    reuse the preloaded model or its figures."""
    evaluator = Evaluator(threads=1)
    assert evaluator.preload(str(two_trials / "a"))
    preloaded_latency = evaluator.preloaded.latency
    result = evaluator.evaluate(_job(two_trials / "b", tmp_path / "best", prepared_data))
    latency = json.loads((tmp_path / "best" / "latency.json").read_text())
    assert latency["measured_at"] > preloaded_latency["measured_at"]  # timed for this evaluation
    expected = evaluate_best(_job(two_trials / "b", tmp_path / "cold", prepared_data))
    assert result["test_accuracy"] == expected["test_accuracy"]
    assert evaluator.preloaded is None  # used up: a later evaluate loads again
