"""The study end to end: `fer-study run` on demo data, a killed-and-resumed study, a failing
trial."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from study.tune.lease import LEASE_FILE
from study.tune.trainable import check_finite

pytestmark = pytest.mark.slow


def test_smoke_study_end_to_end(smoke_study, smoke_space_file):
    space = yaml.safe_load(smoke_space_file.read_text())
    trials = pd.read_csv(smoke_study / "trials.csv")
    backbones = space["backbones"]
    # every backbone got the same budget; every trial finished (completed or stopped early by ASHA)
    assert sorted(trials.backbone) == sorted(backbones * space["trials_per_backbone"])
    assert set(trials.status) <= {"completed", "stopped"}, trials[
        trials.status == "errored"
    ].error.tolist()
    for key in (
        "dropout",
        "unfreeze_layers",
        "lr_head",
        "lr_finetune",
        "image_size",
        "best_val_loss",
        "best_val_accuracy",
        "epochs_run",
        "train_s",
        "images_per_s",
    ):
        assert trials[key].notna().all(), key
    assert trials.trial_id.is_unique
    # the start point ran first for each backbone
    first = trials.sort_values("finished_at").groupby("backbone").head(space["trials_per_backbone"])
    assert (
        (first.dropout == space["start_points"][0]["dropout"]).groupby(first.backbone).any().all()
    )

    test_count = None
    for backbone in backbones:
        best_dir = smoke_study / "best" / backbone
        for name in (
            "config.json",
            "model.keras",
            "history.csv",
            "val_metrics.json",
            "test_metrics.json",
            "test_predictions.csv",
            "selection.json",
        ):
            assert (best_dir / name).is_file(), f"{backbone}: {name} missing"
        selection = json.loads((best_dir / "selection.json").read_text())
        rows = trials[trials.backbone == backbone]
        assert (
            selection["trial_id"] == rows.loc[rows.metric_value.idxmin(), "trial_id"]
        )  # best by val_loss
        assert json.loads((best_dir / "config.json").read_text())["backbone"] == backbone
        metrics = json.loads((best_dir / "test_metrics.json").read_text())
        assert 0.0 <= metrics["accuracy"]["value"] <= 1.0
        low, high = metrics["accuracy"]["ci95"]
        assert low <= metrics["accuracy"]["value"] <= high
        predictions = pd.read_csv(best_dir / "test_predictions.csv")
        assert len(predictions) == metrics["n"] > 0
        test_count = test_count or len(predictions)
        assert len(predictions) == test_count  # the same test split for every backbone

    study = json.loads((smoke_study / "study.json").read_text())
    assert study["status"] == "completed"
    assert study["trials"] == {k: int(v) for k, v in trials.status.value_counts().items()}
    assert study["space"]["backbones"] == backbones and "packages" in study["machine"]
    import optuna

    storage = f"sqlite:///{smoke_study / 'optuna.sqlite3'}"
    names = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    assert names == {f"smoke-{b}": space["trials_per_backbone"] for b in backbones}
    output = (smoke_study / "run_output.txt").read_text()
    assert "Traceback" not in output
    assert sum(
        line.split()[0] in set(trials.trial_id) for line in output.splitlines() if line.strip()
    ) >= len(trials)


def test_a_finished_study_is_not_overwritten_without_resume(smoke_study, smoke_space_file):
    from click.testing import CliRunner

    from study.cli import main

    before = (smoke_study / "trials.csv").read_text()
    result = CliRunner().invoke(main, ["run", str(smoke_study), "--space", str(smoke_space_file)])
    assert result.exit_code == 2 and "--resume" in result.output
    assert (smoke_study / "trials.csv").read_text() == before


def test_non_finite_loss_fails_the_trial_with_the_epoch_named():
    check_finite({"loss": 0.7, "epoch": 1})
    with pytest.raises(FloatingPointError, match="nan at epoch 3"):
        check_finite({"loss": float("nan"), "epoch": 3, "stage": "finetune"})


def _rows(path):
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def test_killed_study_resumes_without_repeating_or_losing_trials(new_study, tmp_path):
    """A second driver on the running study is refused (one driver per study); then SIGKILL the
    driver once two trials have finished (one of them an errored trial: its weights
    file does not exist); its lease refuses --resume until it expires; then --resume: finished
    trials are kept, the rest run, the error stays
    recorded, and the best configuration is retrained with two more seeds (final_seeds). The third
    trial trains longer, so it is still running when the driver is killed (a warm worker runs the
    short ones in about a second)."""
    folder = new_study("killed")
    bad = str(tmp_path / "no-such.weights.h5")
    points = [
        {"dropout": 0.5, "weights": bad, "epochs_finetune": 1},
        {"dropout": 0.3, "weights": "none", "epochs_finetune": 1},
        {"dropout": 0.4, "weights": "none", "epochs_finetune": 40},
    ]
    space = {
        "name": "resume",
        "backbones": ["mobilenet025"],
        "trials_per_backbone": 3,
        "scheduler": {"type": "none"},
        "fixed": {
            "image_size": 32,
            "dense_units": 16,
            "batch_size": 16,
            "epochs_head": 1,
            "patience": 40,
            "augment": 0.0,
        },
        "space": {
            "dropout": {"uniform": [0.1, 0.6]},
            "weights": {"choice": ["none", bad]},
            "epochs_finetune": {"choice": [1, 40]},
        },
        "start_points": points,
        "final_seeds": 2,
    }
    space_file = tmp_path / "resume.yaml"
    space_file.write_text(yaml.safe_dump(space))
    cmd = [
        sys.executable,
        "-m",
        "study.cli",
        "run",
        str(folder),
        "--space",
        str(space_file),
        "--num-cpus",
        "2",
        "--no-dashboard",
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", FER_LEASE_S="4")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        while len(_rows(folder / "trials.csv")) < 2:
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.time() < deadline, "no two trials finished in time"
            time.sleep(0.5)
        # a second driver on the running study (resuming it, or as a new study into its folder):
        # one line naming the first, and the study untouched; the first goes on
        study_json = (folder / "study.json").read_text()
        for again in (["--resume"], []):
            second = subprocess.run(cmd + again, capture_output=True, text=True, env=env)
            lines = [line for line in second.stderr.splitlines() if line.strip()]
            assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
            assert "another driver" in lines[0] and f"pid {proc.pid}" in lines[0], lines[0]
        assert (folder / "study.json").read_text() == study_json
        assert proc.poll() is None and len(_rows(folder / "trials.csv")) == 2
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-study
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver had started (its local Ray)
        except ProcessLookupError:
            pass
    before = _rows(folder / "trials.csv")
    assert len(before) == 2
    # the killed driver's lease, as if it ran on another host (its pid cannot be checked there):
    # --resume is refused until it expires (FER_LEASE_S=4), then goes on
    lease_path = folder / LEASE_FILE
    lease = json.loads(lease_path.read_text())
    lease.update(host="another-host", renewed_at=time.time())
    lease_path.write_text(json.dumps(lease))
    refused = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert "another driver" in lines[0] and "another-host" in lines[0], lines[0]
    time.sleep(max(0.0, lease["renewed_at"] + 4.5 - time.time()))  # the lease expires

    resumed = subprocess.run(
        cmd + ["--resume"], capture_output=True, text=True, timeout=600, env=env
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = pd.read_csv(folder / "trials.csv")
    assert len(after) == 3 and after.trial_id.is_unique
    kept = after.set_index("trial_id").loc[before.trial_id]
    assert list(kept.finished_at) == list(before.finished_at)  # finished trials kept as they were
    assert sorted(after.dropout) == sorted(
        p["dropout"] for p in points
    )  # every start point exactly once
    errored = after[after.status == "errored"]
    assert len(errored) == 1 and "weights file not found" in errored.error.iloc[0]
    assert (after[after.status != "errored"].weights == "none").all()
    best = folder / "best" / "mobilenet025"
    assert (best / "test_metrics.json").is_file()
    seeds = json.loads(
        (best / "seeds.json").read_text()
    )  # final_seeds: 2 other seeds, mean and spread
    assert seeds["test_accuracy"]["n"] == 2 and seeds["test_accuracy"]["std"] >= 0
    assert (
        0
        <= seeds["test_accuracy"]["min"]
        <= seeds["test_accuracy"]["mean"]
        <= seeds["test_accuracy"]["max"]
        <= 1
    )
    assert len(list((best / "seeds").glob("seed-*/test_metrics.json"))) == 2
    study = json.loads((folder / "study.json").read_text())
    assert study["status"] == "completed" and [r["resume"] for r in study["runs"]] == [False, True]
    assert not [p for p in (folder / "trials").iterdir() if not (p / "outcome.json").exists()]
    assert not lease_path.exists()


def test_progress_view_prints_one_line_per_trial_and_redraws_live():
    import io

    from study.tune.progress_view import ProgressView, trial_line

    plain = io.StringIO()
    view = ProgressView(total=2, metric="val_loss", stream=plain, live=False)
    view.started("t1", trial_line("t1", "resnet50", "running", None, "val_loss", {"dropout": 0.5}))
    view.update(
        "t1", trial_line("t1", "resnet50", "running", {"epoch": 1, "val_loss": 1.2}, "val_loss", {})
    )
    view.finished(
        "t1", "errored", trial_line("t1", "resnet50", "errored", None, "val_loss", {}, "OOM")
    )
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("t1") and "dropout=0.5" in lines[0]
    assert "ERROR: OOM" in lines[1] and "errored 1" in lines[2] and len(lines) == 3
    assert "\x1b[" not in plain.getvalue()

    live = io.StringIO()
    view = ProgressView(total=2, metric="val_loss", stream=live, live=True)
    view.started("t1", "t1 running")
    view.started("t2", "t2 running")
    view.finished("t1", "completed", "t1 completed")
    assert "\x1b[2F\x1b[J" in live.getvalue() and live.getvalue().rstrip().endswith("errored 0")
