"""Faults during a study (issue 12, part 3): a trial whose worker process is killed (as an OOM kill
would) runs again from scratch and counts once in its backbone's budget; a trial whose own code
raises is recorded as errored and never retried."""

import json

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow


def test_a_killed_worker_is_retried_and_an_error_is_not(new_study, tmp_path, run_study_cli):
    """Two backbones x three trials at 32 px: per backbone one trial raises (its weights file does
    not exist), one reports a NaN training loss at its first epoch (test-only hook
    FER_TEST_NAN_DROPOUT) and one trains. The first trial to finish an epoch SIGKILLs its own worker
    process (the test-only hook FER_TEST_KILL_ONCE in study/tune/trainable.py), once: Tune runs it
    again from scratch, and every backbone still ends with its full three trials."""
    folder = new_study("faults")
    bad = str(tmp_path / "no-such.weights.h5")
    backbones = ["smallcnn", "mobilenet025"]
    space = {
        "name": "faults",
        "backbones": backbones,
        "trials_per_backbone": 3,
        "scheduler": {"type": "none"},
        "fixed": {
            "image_size": 32,
            "dense_units": 16,
            "batch_size": 16,
            "epochs_head": 1,
            "epochs_finetune": 1,
            "augment": 0.0,
        },
        "space": {"dropout": {"uniform": [0.1, 0.6]}, "weights": {"choice": ["none", bad]}},
        "start_points": [
            {"dropout": 0.5, "weights": bad},
            {"dropout": 0.3, "weights": "none"},
            {"dropout": 0.45, "weights": "none"},
        ],
    }
    space_file = tmp_path / "faults.yaml"
    space_file.write_text(yaml.safe_dump(space))
    marker = tmp_path / "kill-once"
    marker.mkdir()
    proc = run_study_cli(
        folder, space_file, env={"FER_TEST_KILL_ONCE": str(marker), "FER_TEST_NAN_DROPOUT": "0.45"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (marker / "claimed").is_dir()  # the hook did kill a worker

    trials = pd.read_csv(folder / "trials.csv")
    assert (
        sorted(trials.backbone) == sorted(backbones * 3) and trials.trial_id.is_unique
    )  # equal budgets
    errored = trials[trials.status == "errored"]
    assert len(errored) == 4 and (errored.retries == 0).all()  # our own errors are not retried
    raised = errored[errored.weights != "none"]
    assert len(raised) == 2 and raised.error.str.contains("weights file not found").all()
    nan = errored[errored.weights == "none"]
    assert (
        len(nan) == 2
        and nan.error.str.contains("FloatingPointError: training loss is nan at epoch 1").all()
    )
    assert (nan.dropout == 0.45).all() and (nan.epochs_run == 1).all()
    retried = trials[trials.retries > 0]
    assert (
        len(retried) == 1 and retried.retries.iloc[0] == 1 and retried.status.iloc[0] == "completed"
    )
    assert (trials[trials.status != "errored"].weights == "none").all()

    tid = retried.trial_id.iloc[0]
    outcome = json.loads((folder / "trials" / tid / "outcome.json").read_text())
    assert [r["epoch"] for r in outcome["history"]] == [1, 2]  # the new attempt only, from scratch
    assert outcome["retry_errors"] and outcome["retry_errors"][0]
    assert (
        (folder / "trials" / raised.trial_id.iloc[0] / "error.txt")
        .read_text()
        .startswith("Traceback")
    )
    assert "retrying" in proc.stdout

    import optuna

    storage = f"sqlite:///{folder / 'optuna.sqlite3'}"
    for backbone in backbones:
        study = optuna.load_study(study_name=f"faults-{backbone}", storage=storage)
        states = sorted(t.state.name for t in study.trials)
        assert states == ["COMPLETE", "FAIL", "FAIL"], (
            backbone,
            states,
        )  # one Optuna trial per Tune trial
        done = [t for t in study.trials if t.state.name == "COMPLETE"][0]
        row = trials[(trials.backbone == backbone) & (trials.status == "completed")].iloc[0]
        assert done.params["dropout"] == pytest.approx(0.3) and done.value == pytest.approx(
            row.metric_value
        )
    for backbone in backbones:
        assert (folder / "best" / backbone / "test_metrics.json").is_file()
    assert json.loads((folder / "study.json").read_text())["status"] == "completed"


def test_max_retries_must_be_a_whole_number_of_zero_or_more(smoke_space_file, tmp_path):
    from click.testing import CliRunner

    from study.cli import main

    result = CliRunner().invoke(
        main, ["run", str(tmp_path), "--space", str(smoke_space_file), "--max-retries", "-1"]
    )
    assert result.exit_code == 2 and "--max-retries" in result.output
