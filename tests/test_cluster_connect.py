"""`fer-study run --address` refuses, with one line and exit 2, a cluster it cannot join: a closed
port (named, instead of Ray retrying it for minutes) and a token-auth head joined without its token
(naming the variables and file that give it, instead of Ray's 30 s of warnings). A driver with
the right token joins. Real Ray: a head of our own (`ray start --head`, token auth, 0 CPUs) in a
temp dir of our own, stopped by killing its processes (never `ray stop`: other Rays share the
machine)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SPACE = ROOT / "search_spaces" / "smoke.yaml"
RUN_LIMIT_S = 120  # a hang guard, not a speed target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line names `text` (our head's temp dir), and their children."""
    found, parents = [], {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry.name)] = ppid
        if text in cmdline:
            found.append(int(entry.name))
    return found + [pid for pid, ppid in parents.items() if ppid in found and pid not in found]


def _kill_head(temp_dir: str) -> None:
    for pid in _pids_mentioning(temp_dir):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def token_head():
    """A token-auth Ray head with 0 CPUs: (address, token)."""
    temp_dir = tempfile.mkdtemp(prefix="fer_connect_")
    home = Path(temp_dir) / "home"
    home.mkdir()
    token = secrets.token_hex(16)
    port = _free_port()
    env = dict(os.environ, HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    ray_cmd = [sys.executable, "-m", "ray.scripts.scripts"]
    started = subprocess.run(
        ray_cmd
        + ["start", "--head", "--port", str(port), "--temp-dir", f"{temp_dir}/ray"]
        + ["--num-cpus", "0", "--disable-usage-stats", "--include-dashboard=false"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT_S,
    )
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{port}", token
    finally:
        _kill_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run_against(study, address: str, home: Path, **env_vars) -> subprocess.CompletedProcess:
    """The real `fer-study run STUDY --space smoke.yaml --address ADDRESS`, as a driver whose home
    (and so ~/.ray/auth_token) is `home` and whose Ray auth variables are only `env_vars`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.pop("RAY_ADDRESS", None)
    env.update(HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2", **env_vars)
    command = [sys.executable, "-m", "study.cli", "run", str(study), "--space", str(SMOKE_SPACE)]
    return subprocess.run(
        command + ["--address", address, "--no-dashboard"],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT_S,
        env=env,
        cwd=ROOT,
    )


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "rror" in line]


def test_missing_token_is_refused_naming_the_fix(token_head, new_study, tmp_path):
    address, _ = token_head
    proc = _run_against(new_study("no_token"), address, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = _error_lines(proc)
    assert len(errors) == 1, output[-3000:]
    assert "the driver has none" in errors[0] and address in errors[0]
    fixes = ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")
    assert all(fix in errors[0] for fix in fixes)
    assert "gcs_client" not in output  # Ray's retry warnings stay out of the terminal
    assert not list((tmp_path / ".ray").glob("*"))  # no token was made up for the driver


def test_wrong_token_is_refused_as_wrong(token_head, new_study, tmp_path):
    address, _ = token_head
    proc = _run_against(
        new_study("wrong_token"), address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="x" * 32
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert "rejects this driver's token" in output


def test_token_without_token_mode_is_refused_naming_the_mode(token_head, new_study, tmp_path):
    """Ray sends a token to an explicit address only with RAY_AUTH_MODE=token."""
    address, token = token_head
    proc = _run_against(new_study("token_no_mode"), address, tmp_path, RAY_AUTH_TOKEN=token)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "does not send it: set RAY_AUTH_MODE=token" in output, output[-3000:]


def test_right_token_joins(token_head, new_study, tmp_path):
    """With the token the driver joins; the head has 0 CPUs, so the study is then refused by the
    resource check (one line), not by the connect step."""
    address, token = token_head
    proc = _run_against(
        new_study("right_token"), address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token
    )
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    assert "auth token" not in output and "no Ray cluster" not in output, output[-3000:]
    assert "could not join" not in output, output[-3000:]
    assert proc.returncode == 2, output[-3000:]
    assert len(_error_lines(proc)) == 1, output[-3000:]


def test_closed_port_is_refused_naming_the_address(new_study, tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # bound then released: nothing listens there
    proc = _run_against(new_study("closed_port"), address, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = _error_lines(proc)
    assert len(errors) == 1 and address in errors[0], output[-3000:]
    assert "no Ray cluster at" in errors[0]


def test_port_that_is_not_ray_is_refused(new_study, tmp_path):
    """A port that accepts TCP but speaks no Ray (Ray's own client waited 30-60 s per step)."""
    with socket.socket() as listener:
        listener.bind(("", 0))  # Ray resolves 127.0.0.1 to this node's address
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        proc = _run_against(new_study("not_ray"), address, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    errors = _error_lines(proc)
    assert len(errors) == 1 and f"no Ray cluster answers at {address}" in errors[0], output[-3000:]
    assert "rpc_client" not in output  # Ray's connect warnings stay out of the terminal


def test_auto_resolves_through_ray_address(new_study, tmp_path):
    """`--address auto` checks what Ray would join: RAY_ADDRESS first."""
    address = f"127.0.0.1:{_free_port()}"
    proc = _run_against(new_study("auto"), "auto", tmp_path, RAY_ADDRESS=address)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = _error_lines(proc)
    assert len(errors) == 1 and "no Ray cluster at auto" in errors[0], output[-3000:]
    assert address.split(":")[1] in errors[0]
