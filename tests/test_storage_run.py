"""`fer-study run --storage URI`: every bad input is one line before any trial starts (Ray is not
even started), against a real S3-compatible server (moto's server mode in this process). The
whole stored study, on real Ray nodes that share no disk with the driver, is
tests/test_cluster_storage.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from fer.core.errors import UserError
from study.storage import open_storage, write_json
from study.tune.driver import run_study
from tests.s3_server import enforce_auth, serve, set_test_credentials

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SPACE = ROOT / "search_spaces" / "smoke.yaml"


@pytest.fixture(scope="module")
def s3():
    yield from serve("studies")


@pytest.fixture
def creds(monkeypatch):
    set_test_credentials(monkeypatch)


def _refused(source, storage: str, *, match: str, results: Path, **options) -> str:
    """run_study refuses with one line matching `match`, before Ray starts and writing no study."""
    assert not ray.is_initialized()
    with pytest.raises(UserError, match=match) as info:
        run_study(source, SMOKE_SPACE, storage=storage, results_root=results, **options)
    assert not ray.is_initialized(), "Ray was started before the refusal"
    assert "\n" not in str(info.value)
    assert not (results / Path(str(source)).name / "study.json").exists()
    return str(info.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_missing_bucket_and_bad_scheme(s3, creds, new_study, tmp_path):
    study = new_study("bad_places")
    results = study.parent
    port = _closed_port()
    closed = f"s3://studies/x?endpoint_override=127.0.0.1:{port}&scheme=http"
    assert f"127.0.0.1:{port}" in _refused(study, closed, match="cannot reach", results=results)
    _refused(study, s3.uri("no-such-bucket"), match="bucket 'no-such-bucket'", results=results)
    _refused(study, "ftp://host/x", match="scheme 'ftp'", results=results)
    _refused(study, s3.uri("studies") + "&secret_key=x", match="secret_key", results=results)


def test_wrong_and_missing_credentials(s3, new_study, tmp_path, monkeypatch):
    study = new_study("bad_credentials")
    set_test_credentials(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    with enforce_auth():
        line = _refused(study, s3.uri("studies"), match="credentials", results=study.parent)
    assert "AWS_ACCESS_KEY_ID" in line and "not-a-key" not in line
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with enforce_auth():
        line = _refused(study, s3.uri("studies"), match="credentials", results=study.parent)
    assert "missing" in line


def test_ray_client_address_and_resume_of_nothing(s3, creds, new_study, tmp_path):
    study = new_study("resume_nothing")
    root = s3.uri("studies", "empty")
    _refused(study, root, match="ray://", results=study.parent, address="ray://head:10001")
    stored = root.replace("/empty?", "/empty/nothing?")
    line = _refused(stored, root, match="holds no study", results=tmp_path / "r", resume=True)
    assert "empty/nothing" in line
    elsewhere = s3.uri("studies", "other/nothing")
    _refused(elsewhere, root, match="not a study directly under", results=tmp_path / "r")
    with pytest.raises(UserError, match="add --storage"):
        run_study(stored, SMOKE_SPACE, results_root=tmp_path / "r")


def test_a_stored_study_is_not_overwritten_without_resume(s3, creds, new_study, tmp_path):
    study = new_study("taken")
    root = s3.uri("studies", "taken")
    write_json(open_storage(root).child("taken"), "study.json", {"status": "completed"})
    _refused(study, root, match="already holds a study; add --resume", results=study.parent)


def test_the_command_says_it_in_one_line_with_exit_2(s3, new_study, tmp_path):
    """The real command: exit 2, one line on stderr, no traceback."""
    study = new_study("cli_line")
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    command = [sys.executable, "-m", "study.cli", "run", str(study), "--space", str(SMOKE_SPACE)]
    command += ["--storage", s3.uri("missing-bucket"), "--results", str(study.parent)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "bucket 'missing-bucket' does not exist" in lines[0], lines
