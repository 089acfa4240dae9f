"""A study on a Ray cluster whose nodes share no disk, with its home in object storage (issue 22).

Real parts only: a moto S3 server in this process; a token-auth Ray head with 0 CPUs (so every
trial, evaluation and retraining runs on a worker) and two worker nodes, each `ray start` with its
own temp dir, HOME and node cache, all in private mount namespaces (tests/cluster_nodes.py); and
each driver in a mount namespace of its own, on a private tmpfs holding its study folder, space file
and HOME, so a trial that read a driver path would find nothing there. The workers get the S3
credentials in their own environment, as a cluster's nodes do.

The scenario: without --storage the cluster is refused (naming --storage); a driver runs a study
into storage; a second driver on it is refused; the first is SIGKILLed after a trial finished and
the study is resumed from a second, empty namespace (no local folder at all); while the resumed
driver runs the long trial again, the worker node it runs on is killed, and the trial is run again
on the other node and counted once; the study completes with no finished trial lost or repeated,
and its report is built from the storage in a third empty namespace. One study for all of it (the
suite's time budget).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study.storage import list_files, open_storage, read_json
from study.storage.transfer import MARKER
from tests.cluster_nodes import RayNodes, run_private, s3_node_env, unshare_reason
from tests.s3_server import TEST_CREDENTIALS, serve, set_test_credentials

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRIALS = 3
LONG_EPOCHS = 12  # the second trial's fine-tune epochs: still running when the test acts
LIMIT_S = 600


@pytest.fixture(scope="module")
def s3():
    yield from serve("lab")


@pytest.fixture(autouse=True)
def credentials(monkeypatch):
    """This test process reads the storage too (as a user would, with the same variables)."""
    set_test_credentials(monkeypatch)


@pytest.fixture(scope="module")
def cluster():
    reason = unshare_reason()
    if reason:
        pytest.skip(reason)
    with RayNodes() as nodes:
        nodes.add_worker(num_cpus=1, env=s3_node_env(), private=True)
        nodes.add_worker(num_cpus=1, env=s3_node_env(), private=True)
        yield nodes


def _space(tmp_path: Path, long_epochs: int, final_seeds: int = 0) -> Path:
    """One tiny from-scratch CNN at 48 px, three trials: the second trains `long_epochs` epochs so
    the study is still running when the test acts."""
    space = {
        "name": "nodes",
        "backbones": ["smallcnn"],
        "trials_per_backbone": TRIALS,
        "scheduler": {"type": "none"},
        "fixed": {
            "image_size": 48,
            "weights": "none",
            "dense_units": 16,
            "batch_size": 16,
            "epochs_head": 1,
            "unfreeze_layers": 200,
            "patience": 40,
            "augment": 0.0,
        },
        "space": {
            "dropout": {"uniform": [0.1, 0.6]},
            "epochs_finetune": {"choice": [1, long_epochs]},
        },
        "start_points": [
            {"dropout": 0.3, "epochs_finetune": 1},
            {"dropout": 0.4, "epochs_finetune": long_epochs},
            {"dropout": 0.5, "epochs_finetune": 1},
        ],
        "final_seeds": final_seeds,  # retrainings on the workers, through the storage too
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


class Driver:
    """`fer-study run` in a private namespace: /<private>/space.yaml, its study folder (if any) in
    /<private>/results/, HOME in /<private>/home."""

    def __init__(self, cluster: RayNodes, private: Path, space: Path, study: Path | None = None):
        self.private = private
        copies = [(space, "space.yaml")] + ([(study, f"results/{study.name}")] if study else [])
        self.copies = copies
        base = dict(os.environ, **TEST_CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
        base.update(HOME=str(private / "home"), TF_CPP_MIN_LOG_LEVEL="2", FER_LEASE_S="6")
        self.env = cluster.driver_env(base)
        self.address = cluster.address

    def command(self, source: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "study.cli",
            "run",
            source,
            "--space",
            str(self.private / "space.yaml"),
            "--results",
            str(self.private / "results"),
            "--address",
            self.address,
            "--no-dashboard",
            *extra,
        ]

    def start(self, source: str, *extra: str) -> subprocess.Popen:
        return run_private(
            self.command(source, *extra),
            self.private,
            self.copies,
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def run(self, source: str, *extra: str, timeout: float = LIMIT_S) -> tuple[int, str, str]:
        proc = self.start(source, *extra)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            _kill(proc)
        return proc.returncode, out, err


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _outcomes(storage) -> dict[str, dict]:
    names = [n for n in list_files(storage, "trials") if n.endswith("/outcome.json")]
    return {n.split("/")[0]: read_json(storage, f"trials/{n}") for n in names}


def _wait(proc: subprocess.Popen, ready, what: str, limit: float = LIMIT_S) -> None:
    deadline = time.time() + limit
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the driver ended before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        assert time.time() < deadline, f"not {what} in time"
        time.sleep(0.5)


def _one_line(code: int, err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, f"exit {code}:\n{err[-3000:]}"
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def _long_trials(cluster: RayNodes, study: str):
    """(node, trial folder) of every attempt of the long trial in the worker nodes' caches."""
    for node in cluster.workers:
        for config in (node.host_dir / "cache" / study).glob("work-*/trials/*/config.json"):
            if json.loads(config.read_text()).get("epochs_finetune") == LONG_EPOCHS:
                yield node, config.parent


def _running_long_trial(cluster: RayNodes, study: str, seen: set):
    """(node, trial id) of a new attempt of the long trial that has trained a few epochs."""
    for node, folder in _long_trials(cluster, study):
        history = folder / "history.csv"
        if folder not in seen and history.is_file() and len(history.read_text().splitlines()) > 3:
            return node, folder.name
    return None


def test_stored_study_survives_its_driver_and_a_worker_node(cluster, s3, new_study, tmp_path):
    study = new_study("lab_study")
    space = _space(tmp_path, long_epochs=LONG_EPOCHS, final_seeds=1)
    root = s3.uri("lab", "studies")
    storage = open_storage(root).child(study.name)
    stored = root.replace("/studies?", f"/studies/{study.name}?")
    first = Driver(cluster, tmp_path / "d1", space, study)
    local = str(first.private / "results" / study.name)

    # nodes that share no disk, and no --storage: refused, naming it
    code, _, err = first.run(local)
    _one_line(code, err, "--storage", "cannot see it")

    driver = first.start(local, "--storage", root)
    try:
        _wait(driver, lambda: len(_outcomes(storage)) >= 1, "a trial finished")
        # a second driver, from another namespace, on the running study: refused
        second = Driver(cluster, tmp_path / "d2", space)
        code, _, err = second.run(stored, "--storage", root, "--resume", timeout=120)
        _one_line(code, err, "another driver", f"pid {driver.pid}")
        before = _outcomes(storage)
        assert driver.poll() is None, "the study ended before the kill: lengthen the long trial"
        _kill(driver)  # the driver's machine is lost
        driver.wait(timeout=30)
    finally:
        _kill(driver)

    # a new machine, with no results folder at all, resumes; the long trial runs again, and the
    # worker node it runs on is lost in the middle of it
    seen = {folder for _, folder in _long_trials(cluster, study.name)}
    resumed = Driver(cluster, tmp_path / "d3", space)
    driver = resumed.start(stored, "--storage", root, "--resume", "--max-retries", "2")
    try:
        _wait(driver, lambda: _running_long_trial(cluster, study.name, seen), "the long trial ran")
        node, lost_trial = _running_long_trial(cluster, study.name, seen)
        cluster.kill_worker(node)
        out, err = driver.communicate(timeout=LIMIT_S)
        assert driver.returncode == 0, out[-3000:] + err[-3000:]
    finally:
        _kill(driver)

    after = _outcomes(storage)
    assert len(after) == TRIALS, sorted(after)
    # the lost node's trial ran again on the other node and counts once
    assert after[lost_trial]["retries"] >= 1 and after[lost_trial]["status"] == "completed"
    assert sum(o["retries"] for o in after.values()) == after[lost_trial]["retries"]
    for trial_id, outcome in before.items():  # finished trials kept as they were
        assert after[trial_id] == outcome
    points = sorted(
        (o["config"]["dropout"], o["config"]["epochs_finetune"]) for o in after.values()
    )
    assert points == [(0.3, 1), (0.4, LONG_EPOCHS), (0.5, 1)], points  # each start point once
    study_json = read_json(storage, "study.json")
    assert study_json["status"] == "completed" and len(study_json["runs"]) == 2
    assert study_json["storage"] == stored and "testing" not in json.dumps(study_json)
    files = list_files(storage)
    for trial_id in after:  # every trial's folder is in storage
        assert (
            f"trials/{trial_id}/config.json" in files and f"trials/{trial_id}/history.csv" in files
        )
    best = read_json(storage, f"best/smallcnn/{MARKER}")
    assert best is not None and "test_metrics.json" in best["files"]
    assert read_json(storage, "best/smallcnn/selection.json")["trial_id"] in after
    seeds = read_json(storage, "best/smallcnn/seeds.json")
    assert seeds["test_accuracy"]["n"] == 1, seeds
    assert any(n.startswith("best/smallcnn/seeds/seed-") for n in files)
    assert read_json(storage, "driver_lease.json") is None  # released at the end
    # the resuming driver's mirror holds the finished study
    assert "study finished" in out

    # the report, on a third machine that has only the storage
    reader = Driver(cluster, tmp_path / "d4", space)
    out_dir = reader.private / "report"
    report = [sys.executable, "-m", "study.cli", "report", stored, "--out", str(out_dir)]
    report += ["--results", str(reader.private / "results"), "--gradcam-per-class", "0"]
    script = f"{shlex.join(report)} && test -s {out_dir}/report.html"
    script += f" && cat {out_dir}/comparison.csv"
    proc = run_private(
        ["sh", "-c", script],
        reader.private,
        env=reader.env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    table = out.split("report.html", 1)[-1]  # what follows the command's "Report: ..." line
    assert "smallcnn" in table, out[-2000:]
