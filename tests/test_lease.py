"""One driver per study (study.tune.lease): the lease on a local folder and on S3-compatible
storage (moto's server), and, end to end, a second `fer-study run` refused while a study runs and a
killed driver's study resumed once its lease expired."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import yaml

from study.tune.lease import LEASE_FILE, LeaseHeld, StudyLease


def test_second_owner_refused_with_host_pid_and_since_until_released(tmp_path):
    first = StudyLease.in_folder(tmp_path / "study", expires_after_s=30, settle_s=0.05)
    with first:
        second = StudyLease.in_folder(tmp_path / "study", expires_after_s=30, settle_s=0.05)
        with pytest.raises(LeaseHeld) as refused:
            second.acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert socket.gethostname() in message and f"pid {os.getpid()}" in message
        assert "since 20" in message and "UTC" in message
        assert json.loads((tmp_path / "study" / LEASE_FILE).read_text())["token"] == first.token
    assert not (tmp_path / "study" / LEASE_FILE).exists()  # released at the end
    with StudyLease.in_folder(tmp_path / "study", settle_s=0.05) as third:
        assert third.held


def test_lease_is_renewed_while_held(tmp_path):
    with StudyLease.in_folder(tmp_path, expires_after_s=1.2, settle_s=0.05):
        first = json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"]
        time.sleep(1.0)  # renewals every 0.2 s
        assert json.loads((tmp_path / LEASE_FILE).read_text())["renewed_at"] > first


def _stale_lease(folder, **fields):
    lease = {
        "host": "another-host",
        "pid": 12345,
        "token": "f" * 32,
        "started_at": time.time() - 100,
        "renewed_at": time.time(),
        "expires_after_s": 60,
        **fields,
    }
    (folder / LEASE_FILE).write_text(json.dumps(lease))


def test_expired_lease_and_dead_pid_on_this_host_are_taken_over(tmp_path):
    _stale_lease(tmp_path, renewed_at=time.time() - 61)  # expired
    with StudyLease.in_folder(tmp_path, settle_s=0.05) as lease:
        assert lease.held
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _stale_lease(tmp_path, host=socket.gethostname(), pid=dead.pid)  # fresh, but its pid is gone
    with StudyLease.in_folder(tmp_path, settle_s=0.05) as lease:
        assert lease.held
    _stale_lease(tmp_path)  # fresh, on another host: refused
    with pytest.raises(LeaseHeld, match="another-host"):
        StudyLease.in_folder(tmp_path, settle_s=0.05).acquire()


@pytest.fixture
def s3_bucket(monkeypatch):
    """A bucket on moto's S3 server (its own port, in this process) and a pyarrow S3FileSystem."""
    pytest.importorskip("moto.server")
    import boto3
    from moto.server import ThreadedMotoServer
    from pyarrow import fs as pafs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="studies")
    s3 = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1")
    try:
        yield s3
    finally:
        server.stop()


def _race(leases) -> dict:
    """Every lease acquired at the same moment, one thread each: {index: "owner" or the refusal}."""
    barrier = threading.Barrier(len(leases))
    outcomes = {}

    def start(i):
        barrier.wait()
        try:
            leases[i].acquire()
            outcomes[i] = "owner"
        except LeaseHeld as exc:
            outcomes[i] = str(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_two_drivers_starting_together_on_s3_end_with_one_owner(s3_bucket):
    path = f"studies/demo/{LEASE_FILE}"
    for _ in range(3):  # a few rounds: the outcome must not depend on who writes last
        leases = [StudyLease(s3_bucket, path, expires_after_s=30, settle_s=0.5) for _ in range(2)]
        outcomes = _race(leases)
        assert sorted(o == "owner" for o in outcomes.values()) == [False, True], outcomes
        owner = next(lease for i, lease in enumerate(leases) if outcomes[i] == "owner")
        with pytest.raises(LeaseHeld):  # a third driver, later: refused too
            StudyLease(s3_bucket, path, expires_after_s=30, settle_s=0.1).acquire()
        owner.release()
        assert s3_bucket.get_file_info(path).type.name == "NotFound"


# ---- end to end: real `fer-study run` processes


def _space_file(tmp_path, trials: int, long_epochs: int) -> str:
    """A tiny study (mobilenet025 at 32 px): short trials, and one that trains longer so the study
    is still running when the test acts."""
    points = [
        {"dropout": 0.3, "epochs_finetune": 1},
        {"dropout": 0.4, "epochs_finetune": long_epochs},
        {"dropout": 0.5, "epochs_finetune": 1},
    ][:trials]
    space = {
        "name": "lease",
        "backbones": ["mobilenet025"],
        "trials_per_backbone": trials,
        "scheduler": {"type": "none"},
        "fixed": {
            "image_size": 32,
            "dense_units": 16,
            "batch_size": 16,
            "epochs_head": 1,
            "patience": 40,
            "augment": 0.0,
            "weights": "none",
        },
        "space": {
            "dropout": {"uniform": [0.1, 0.6]},
            "epochs_finetune": {"choice": [1, long_epochs]},
        },
        "start_points": points,
    }
    path = tmp_path / "lease.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def _command(folder, space_file) -> list[str]:
    return [sys.executable, "-m", "study.cli", "run", str(folder), "--space", space_file]


def _start(cmd, env):
    cmd = cmd + ["--num-cpus", "2", "--no-dashboard"]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )


def _wait_for(proc, ready, what: str, limit: float = 300) -> None:
    deadline = time.time() + limit
    while not ready():
        assert proc.poll() is None, f"the study ended before {what}"
        assert time.time() < deadline, f"not {what} in time"
        time.sleep(0.5)


def _refused(cmd, env, *expected: str, resume: bool = True) -> None:
    """A second driver (`--resume`, or a new study into the same folder): exit 2 with one line
    naming the holder."""
    second = subprocess.run(
        cmd + ["--resume"] * resume + ["--num-cpus", "2", "--no-dashboard"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert len(lines) == 1 and "another driver" in lines[0], second.stderr
    assert all(word in lines[0] for word in ("host ", "pid ", "since ", *expected)), lines[0]


def _rows(path):
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the driver had started (its local Ray)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_second_driver_on_a_running_study_is_refused_and_the_first_completes(new_study, tmp_path):
    folder = new_study("running")
    cmd = _command(folder, _space_file(tmp_path, trials=2, long_epochs=6))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    first = _start(cmd, env)
    try:
        trials = folder / "trials"
        _wait_for(first, lambda: trials.is_dir() and any(trials.iterdir()), "a trial started")
        study_json = (folder / "study.json").read_text()
        _refused(cmd, env, f"pid {first.pid}")
        _refused(cmd, env, f"pid {first.pid}", resume=False)  # as a new study into the folder
        assert (folder / "study.json").read_text() == study_json  # untouched
        assert first.wait(timeout=600) == 0
    finally:
        _kill_group(first)
    study = json.loads((folder / "study.json").read_text())
    assert study["status"] == "completed" and len(study["runs"]) == 1
    assert len(pd.read_csv(folder / "trials.csv")) == 2
    assert not (folder / LEASE_FILE).exists()
