"""A real multi-node Ray cluster on one machine, whose nodes share nothing they would not share on
separate machines, for end-to-end tests of `fer-study run --storage s3://...` (like `s3_server.py`,
a helper module, not a test file).

- `RayNodes`: a token-auth head with 0 CPUs (so no task ever runs on it) and worker nodes added one
  by one, each a separate `ray start` with its own Ray temp dir, HOME, node-local cache folder
  (`FER_NODE_CACHE`) and environment (tests pass the S3 credentials there, so the trial processes
  inherit them from their raylet as on a real cluster); `kill_worker` is a machine loss (SIGKILL of
  every process of that node), `close` leaves no process and no file behind.
- `run_private`: a process (a driver) in a mount namespace of its own, with a fresh tmpfs over a
  folder: what it writes there no other process sees (Ray workers included), as on another machine.
  `unshare_reason` says why that cannot work here (for `pytest.skip`), or None.

What is isolated and what is not: nodes share the machine's network, CPUs and /dev/shm (each raylet
has its own object store in it) and the filesystem. A node's folders are separate paths, readable by
any process given them, unless the node is started with `add_worker(private=True)`: then they exist
only in the node's own mount namespace. So a test proves "no shared disk" for paths inside a
`run_private` folder (the driver's study folder and HOME belong there) and inside private nodes.
The head is never private: drivers reach Ray through its raylet's socket in its temp dir, and a
driver is on the head's machine.

Every process of the cluster (nodes, and drivers started with `driver_env`) carries the marker
variable `FER_TEST_RAY_CLUSTER=<root>` and every process of a node `FER_TEST_RAY_NODE=<node dir>`:
Ray renames some of its processes (`ray::DashboardAgent`), so their command line does not name the
temp dir, but they inherit the environment, and it is by these markers (and by the temp dir in the
command line) that nodes are killed. Never `ray stop`: other Rays share the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from study.storage.shipping import CACHE_ENV  # FER_NODE_CACHE: the node-local cache folder
from tests.s3_server import TEST_CREDENTIALS

CLUSTER_MARKER = "FER_TEST_RAY_CLUSTER"
NODE_MARKER = "FER_TEST_RAY_NODE"
RAY_START_TIMEOUT_S = 90  # a hang guard for one `ray start`, not a speed target
NODE_WAIT_S = 30  # for a started node to be alive in the node table
DEAD_WAIT_S = 20  # for a killed node to be dead there (about 3 s with the health checks below)
OBJECT_STORE_BYTES = 200 * 1024**2  # per node; Ray's default (30% of RAM each) is wasteful here

# The GCS marks a node dead after `health_check_failure_threshold` failed checks, one every
# `health_check_period_ms`: Ray's defaults (3000 ms x 5) take about 15 s after a raylet is killed.
# A killed raylet refuses the check at once (its port is closed), so 1000 ms x 3 finds it dead in
# about 3 s; the per-check timeout stays Ray's (10 s), so a raylet that is only slow (a busy 2-core
# CI machine) must miss three 10 s checks in a row before it is declared dead by mistake. The GCS
# runs the checks, so they go to the head as `ray start --system-config` (a hidden but supported
# flag; RAY_health_check_period_ms etc. in the head's environment would do the same).
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}

# Read the node table as `ray.nodes()` does (`GlobalState.node_table`), without joining the cluster
# as a driver (which would add a job and a few seconds): polls until every wanted node (by Ray temp
# dir) is in the wanted state, prints the table as JSON, exits 1 on timeout.
_NODE_TABLE_SCRIPT = r"""
import json, sys, time
import ray._private.state as state
from ray._raylet import GcsClientOptions

address, wanted, timeout = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
accessor = state.GlobalState()
accessor._initialize_global_state(
    GcsClientOptions.create(address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False)
)
deadline = time.monotonic() + timeout
while True:
    table = accessor.node_table()
    alive = {n["RayletSocketName"].split("/session_")[0]: n["Alive"] for n in table}
    if all(alive.get(temp_dir) is want for temp_dir, want in wanted.items()):
        break
    if time.monotonic() > deadline:
        print(json.dumps(table, default=str))
        sys.exit(1)
    time.sleep(0.1)
print(json.dumps(table, default=str))
"""


def s3_node_env() -> dict:
    """What a worker node needs to reach `tests.s3_server.S3Server` (pass it to `add_worker`): the
    moto test credentials, a region, and no EC2 metadata lookup (without credentials botocore and
    pyarrow would ask 169.254.169.254 and wait), as `set_test_credentials` sets for the test."""
    return {
        **TEST_CREDENTIALS,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def free_port() -> int:
    """A port nothing listens on now (bound then released: ports for Ray's servers, so two
    clusters on the machine, or a developer's own Ray, never collide on Ray's fixed defaults)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cmd() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _clean_env(base: dict | None) -> dict:
    """`base` (default: this process's environment) without what would join or configure another
    cluster (RAY_ADDRESS, RAY_AUTH_*) and without what a node must only get from its own `env`
    (AWS_* credentials, the node cache), so a test proves where a value came from."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        if name == "RAY_ADDRESS" or name.startswith(("RAY_AUTH", "AWS_")) or name == CACHE_ENV:
            env.pop(name)
    return env


def _processes() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, command line, environment) of every readable, non-zombie process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X"):  # a zombie waits for its parent; it runs nothing
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = (int(fields[1]), cmdline, environ)
    return found


def pids_of(marker: str, value: str) -> list[int]:
    """Processes that belong to `value` (a cluster root or a node dir): `marker=value` in their
    environment or a path under `value` in their command line (`value/`: node-1 is not node-10),
    and every descendant of those; never this process or its ancestors."""
    table = _processes()
    needle, under = f"{marker}={value}".encode(), f"{value}/"
    found = {
        pid
        for pid, (_, cmdline, environ) in table.items()
        if needle in environ.split(b"\0") or under in cmdline
    }
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    mine, pid = set(), os.getpid()
    while pid > 1:
        mine.add(pid)
        pid = table.get(pid, (0,))[0]
    return sorted(found - mine)


def kill_all(marker: str, value: str, wait_s: float = 10) -> list[int]:
    """SIGKILL every process of `value` (see `pids_of`), again until none is left or `wait_s`
    passes (a process may fork while we kill). Returns what is left (empty when clean)."""
    deadline = time.monotonic() + wait_s
    while True:
        pids = pids_of(marker, value)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return f"--- {path}\n{path.read_text(errors='replace')[-chars:]}"
    except OSError:
        return ""


@dataclass
class RayNode:
    """One node of `RayNodes`: its folders as its processes see them (`dir/ray` Ray's temp dir,
    `dir/home` its HOME, `dir/cache` its FER_NODE_CACHE, workers only; the test reads them under
    `host_dir`), the environment its processes got on top of the test's (less RAY_ADDRESS,
    RAY_AUTH_*, AWS_*, FER_NODE_CACHE), and its Ray node id (hex)."""

    name: str
    dir: Path
    env: dict
    num_cpus: float
    private: bool = False
    node_id: str = ""
    killed: bool = False
    start_output: str = field(default="", repr=False)

    @property
    def host_dir(self) -> Path:
        """Where the test reads this node's files: `dir` itself, or for a private node the folder
        bind-mounted over `dir` inside the node's mount namespace (`<root>/.private/<name>`)."""
        return self.dir.parent / ".private" / self.name if self.private else self.dir

    @property
    def temp_dir(self) -> Path:
        return self.dir / "ray"

    @property
    def home(self) -> Path:
        return self.dir / "home"

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"

    def logs_tail(self) -> str:
        """`ray start`'s output and the end of the raylet's and GCS's logs: what an assertion
        message needs to say why a node did not come up or went away."""
        logs = sorted((self.host_dir / "ray").glob("session_*/logs"))
        parts = [f"--- ray start output\n{self.start_output[-2000:]}"]
        for log_dir in logs[-1:]:
            for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
                parts.append(_tail(log_dir / name))
        return "\n".join(p for p in parts if p)


class RayNodes:
    """A Ray cluster on this machine made of separate `ray start` nodes (a context manager).

    The head has 0 CPUs and 0 GPUs, so every task and trial runs on a worker added with
    `add_worker`; token auth is on (RAY_AUTH_MODE=token and a random RAY_AUTH_TOKEN in the
    environment of every `ray start`; `driver_env` gives a driver the same); the dashboard and usage
    stats are off; every port Ray would otherwise take at a fixed default (client server 10001,
    dashboard 8265, dashboard agent 52365) is a free one, so it can run beside any other Ray.
    `root` (default: a new folder in /tmp, short because Ray's Unix socket paths under a node's
    temp dir must stay within 107 bytes) holds `head/` and `node-<i>/`, and is removed on close.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        object_store_bytes: int = OBJECT_STORE_BYTES,
        system_config: dict | None = None,
    ):
        self.root = Path(root or tempfile.mkdtemp(prefix="fer_rn_", dir="/tmp")).resolve()
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.object_store_bytes = object_store_bytes
        self.system_config = dict(FAST_HEALTH_CHECKS if system_config is None else system_config)
        self.head = RayNode("head", self.root / "head", {}, 0)
        self.workers: list[RayNode] = []
        self.started = False

    # ---- lifecycle

    def __enter__(self) -> RayNodes:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> RayNodes:
        """Start the head and wait until it is alive in the node table."""
        try:
            self._start_node(
                self.head,
                ["--head", "--port", str(self.port), "--num-cpus", "0", "--num-gpus", "0"]
                + ["--include-dashboard=false", "--dashboard-port", str(free_port())]
                + ["--ray-client-server-port", str(free_port())]
                + ["--system-config", json.dumps(self.system_config)],
            )
            self.started = True
        except BaseException:
            self.close()
            raise
        return self

    def add_worker(
        self,
        num_cpus: float = 1,
        env: dict | None = None,
        *,
        num_gpus: float = 0,
        resources: dict | None = None,
        private: bool = False,
    ) -> RayNode:
        """Start one more node (`ray start --address`), with its own Ray temp dir (Ray takes
        `--temp-dir` per node), HOME and FER_NODE_CACHE, and `env` on top of them (e.g.
        `s3_node_env()`, which its raylet and so every worker process on it inherits). Returns
        once the node is alive in the node table; fails with its logs if it is not.

        `private` (needs `unshare_reason() is None`): the node's folder (temp dir, HOME, cache,
        and so Tune's local trial folders) exists only inside the node's own mount namespace, which
        its raylet and every worker process inherit: a path on this node read by a driver or
        another node finds an empty folder, as on separate machines. Without it the node's folders
        are separate but readable by any process that is given their path."""
        assert self.started, "RayNodes.start() (or `with RayNodes() as nodes`) first"
        name = f"node-{len(self.workers) + 1}"
        node = RayNode(name, self.root / name, {}, num_cpus, private=private)
        node.env = {CACHE_ENV: str(node.cache_dir), **(env or {})}
        self.workers.append(node)
        extra = ["--resources", json.dumps(resources)] if resources else []
        self._start_node(
            node,
            ["--address", self.address, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)]
            + extra,
        )
        return node

    def kill_worker(self, node: RayNode, dead_within_s: float = DEAD_WAIT_S) -> float:
        """A machine loss: SIGKILL every process of `node` (its raylet, agents, workers), then
        wait until the node table says it is dead. Returns the seconds that took (from the kill);
        fails with the node table if it stays alive past `dead_within_s`."""
        left = kill_all(NODE_MARKER, str(node.dir))
        assert not left, f"{node.name}: processes survived SIGKILL: {left}"
        killed_at = time.monotonic()
        node.killed = True
        ok, table = self._wait_states({str(node.temp_dir): False}, dead_within_s)
        assert ok, (
            f"{node.name} ({node.node_id}) still alive in the node table {dead_within_s} s after "
            f"its processes were killed: {json.dumps(table)[:3000]}"
        )
        return time.monotonic() - killed_at

    def close(self) -> None:
        """Kill every process of the cluster (nodes and drivers carrying `driver_env`'s marker),
        check none is left, remove `root`. Safe to call twice."""
        left = kill_all(CLUSTER_MARKER, str(self.root))
        self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
        assert not left, f"processes of {self.root} survived SIGKILL: {left}"

    # ---- joining

    @property
    def address(self) -> str:
        """The head's GCS address, `127.0.0.1:PORT`, as `ray.init(address=...)` and
        `fer-study run --address` take it."""
        return f"127.0.0.1:{self.port}"

    def driver_env(self, base: dict | None = None) -> dict:
        """The environment a driver needs to join: `base` (default: this process's) with
        RAY_AUTH_MODE=token and the token, RAY_ADDRESS removed (the address is given explicitly),
        and the cluster marker so `close` also ends a driver left running. `base`'s AWS_* and
        FER_NODE_CACHE are kept: the driver is the user's shell."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_ADDRESS", None)
        for name in [n for n in env if n.startswith("RAY_AUTH")]:
            env.pop(name)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env[CLUSTER_MARKER] = str(self.root)
        return env

    def node_table(self) -> list[dict]:
        """`ray.nodes()` of the cluster (read from the GCS without joining as a driver)."""
        ok, table = self._wait_states({}, 10)
        assert ok, table
        return table

    # ---- internals

    def _node_env(self, node: RayNode) -> dict:
        env = _clean_env(None)
        env.update(
            HOME=str(node.home),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            **{CLUSTER_MARKER: str(self.root), NODE_MARKER: str(node.dir)},
        )
        env.update(node.env)
        return env

    def _start_node(self, node: RayNode, args: list[str]) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)  # for a private node: empty, seen from outside
        folders = ["ray", "home"] + (["cache"] if CACHE_ENV in node.env else [])
        for folder in folders:  # made where the node will see them (see RayNode.host_dir)
            (node.host_dir / folder).mkdir(parents=True, exist_ok=True)
        command = _ray_cmd() + ["start", *args, "--temp-dir", str(node.temp_dir)]
        command += ["--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats"]
        command += ["--dashboard-agent-listen-port", str(free_port())]
        if node.private:
            q = shlex.quote
            script = (
                f"mount --bind {q(str(node.host_dir))} {q(str(node.dir))} && cd {q(str(node.dir))}"
            )
            command = _unshare(script) + command
        try:
            proc = subprocess.run(
                command,
                env=self._node_env(node),
                cwd=node.host_dir,
                capture_output=True,
                text=True,
                timeout=RAY_START_TIMEOUT_S,
            )
            node.start_output = proc.stdout + proc.stderr
            started = proc.returncode == 0
        except subprocess.TimeoutExpired as timeout:
            node.start_output = f"timed out after {RAY_START_TIMEOUT_S} s: {timeout}"
            started = False
        assert started, f"`ray start` of {node.name} failed:\n{node.logs_tail()}"
        ok, table = self._wait_states({str(node.temp_dir): True}, NODE_WAIT_S)
        assert ok, (
            f"{node.name} not alive in the node table after {NODE_WAIT_S} s: "
            f"{json.dumps(table)[:2000]}\n{node.logs_tail()}"
        )
        mine = [n for n in table if n["RayletSocketName"].startswith(f"{node.temp_dir}/")]
        node.node_id = mine[-1]["NodeID"]

    def _wait_states(self, wanted: dict[str, bool], timeout: float) -> tuple[bool, list | str]:
        """Poll the node table until each node (by Ray temp dir) is alive (True) or dead (False):
        (reached, table), the table as `ray.nodes()` gives it, or the poller's error text."""
        proc = subprocess.run(
            [sys.executable, "-c", _NODE_TABLE_SCRIPT, self.address, json.dumps(wanted)]
            + [str(timeout)],
            env=self.driver_env(_clean_env(None)),
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        try:
            table = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return False, (proc.stdout + proc.stderr)[-3000:]
        return proc.returncode == 0, table


# ---- a process with a private folder (a driver "on another machine")


def run_private(
    cmd: list[str],
    private_dir: str | Path,
    copies=(),
    env: dict | None = None,
    **popen_kwargs,
) -> subprocess.Popen:
    """Start `cmd` in a mount namespace of its own (`unshare --mount --propagation private`; needs
    root or CAP_SYS_ADMIN, see `unshare_reason`) in which a fresh tmpfs covers `private_dir`, after
    copying each `(src, dst)` of `copies` there (`dst` relative to `private_dir`, or absolute inside
    it; `cp -a`). What the process writes under `private_dir` exists only for it and its children:
    every other process (Ray's workers, this test) sees the folder as it is outside, empty. `env` is
    the whole environment (default: this process's), as for `subprocess.Popen`, like
    `popen_kwargs`. The process is `unshare` turned into `cmd` (exec), so its pid is `cmd`'s.
    For a driver, put its study folder and HOME (Ray Tune's ~/ray_results) under `private_dir`
    (HOME through `env`): then nothing it keeps locally can be read by a trial by mistake."""
    private_dir = Path(private_dir).resolve()
    private_dir.mkdir(parents=True, exist_ok=True)  # the mount point, empty outside
    q = shlex.quote
    script = [f"mount -t tmpfs -o mode=0700 fer-private {q(str(private_dir))}"]
    for src, dst in copies:
        target = Path(os.path.normpath(private_dir / dst))  # absolute dst: the `/` keeps it
        if target != private_dir and private_dir not in target.parents:
            raise ValueError(f"copy destination {dst} is not inside {private_dir}")
        script.append(f"mkdir -p {q(str(target.parent))}")
        script.append(f"cp -a {q(str(Path(src).resolve()))} {q(str(target))}")
    return subprocess.Popen(
        _unshare("\n".join(script)) + list(map(str, cmd)), env=env, **popen_kwargs
    )


def _unshare(script: str) -> list[str]:
    """The command prefix that runs shell `script` (mounts) in a new private mount namespace, then
    execs the command that follows it (so the process keeps one pid and inherits the mounts)."""
    full = f'set -e\n{script}\nexec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", full, "sh"]


_UNSHARE_REASON: list[str | None] = []


def unshare_reason() -> str | None:
    """None when `run_private` works here (a private tmpfs mounts, and does not show outside);
    else why not, for `pytest.skip` (no `unshare`, not root, a container without CAP_SYS_ADMIN)."""
    if _UNSHARE_REASON:
        return _UNSHARE_REASON[0]
    reason = None
    if shutil.which("unshare") is None:
        reason = "no `unshare` command (util-linux) on this machine"
    else:
        probe = Path(tempfile.mkdtemp(prefix="fer_unshare_"))
        try:
            proc = run_private(
                ["sh", "-c", 'touch "$0/written" && test -f "$0/written"', str(probe)],
                probe,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            output, _ = proc.communicate(timeout=30)
            if proc.returncode != 0:
                reason = f"unshare --mount with a tmpfs is not permitted here: {output.strip()}"
            elif any(probe.iterdir()):
                reason = f"a private tmpfs at {probe} leaked into the outer mount namespace"
        except (OSError, subprocess.SubprocessError) as error:
            reason = f"unshare --mount failed: {error}"
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    _UNSHARE_REASON.append(reason)
    return reason
