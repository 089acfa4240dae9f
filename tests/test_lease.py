"""One driver per study (study.tune.lease): the lease on a local folder and on S3-compatible
storage (moto's server). End to end, with real `fer-study run` processes: a second driver refused
and a killed driver's lease expiring, tests/test_study.py (local) and tests/test_cluster_storage.py
(storage)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

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
