"""The multi-node harness (`tests/cluster_nodes.py`) does what end-to-end storage tests rely on,
with real Ray: a driver in a private mount namespace joins the token-auth cluster, its task runs on
the worker node (never the 0-CPU head) and cannot see the driver's private files; the worker's
processes carry the node's FER_NODE_CACHE, HOME and the credentials given to `add_worker`; closing
leaves no process behind. A killed worker node and a trial retried on another is
tests/test_cluster_storage.py's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_nodes import (
    CACHE_ENV,
    RayNodes,
    run_private,
    s3_node_env,
    unshare_reason,
)
from tests.s3_server import TEST_CREDENTIALS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER_LIMIT_S = 180  # a hang guard, not a speed target
ENV_NAMES = [CACHE_ENV, "HOME", *TEST_CREDENTIALS, "AWS_EC2_METADATA_DISABLED"]

# A driver: writes a file in its private folder, says so and waits for a line on stdin (the test
# looks at the folder from outside meanwhile), joins the cluster, runs one task that writes a file
# in its node's cache and reports where it ran, what it sees of the driver's files and its
# environment; prints all as one JSON line.
DRIVER = r"""
import json, os, sys
import ray

address, private_dir, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
secret = os.path.join(private_dir, "secret.txt")
with open(secret, "w") as f:
    f.write("only the driver sees this")
print("WRITTEN", flush=True)
sys.stdin.readline()
ray.init(address=address, logging_level="ERROR", log_to_driver=False)


@ray.remote(num_cpus=1)
def probe(paths, names):
    cache_file = os.path.join(os.environ["FER_NODE_CACHE"], f"written-by-task-{os.getpid()}")
    with open(cache_file, "w") as f:
        f.write("node-local")
    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "task_sees": {p: os.path.exists(p) for p in paths},
        "env": {n: os.environ.get(n) for n in names},
        "cache_file": cache_file,
    }


paths = [secret, os.path.abspath(__file__)]
result = ray.get(probe.remote(paths, names), timeout=120)
result["driver_sees"] = {p: os.path.exists(p) for p in paths}
result["driver_node_id"] = ray.get_runtime_context().get_node_id()
print(json.dumps(result), flush=True)
"""


@pytest.fixture(scope="module")
def nodes():
    """The cluster of this module: head + `first` worker (with test credentials; private where
    unshare works); on teardown, nothing of it may be left running."""
    with RayNodes() as cluster:
        cluster.private = unshare_reason() is None
        cluster.first = cluster.add_worker(env=s3_node_env(), private=cluster.private)
        yield cluster
        root = str(cluster.root)
    left = subprocess.run(["pgrep", "-af", root], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes of the cluster left after close:\n{left}"


def _run_driver(nodes: RayNodes, folder: Path, private: bool) -> tuple[dict, list[str]]:
    """Run DRIVER (copied into `folder/private`; in a private tmpfs there when `private`), and
    return its JSON result and what `folder/private` held, seen from outside, while it ran."""
    script = folder / "driver.py"
    script.write_text(DRIVER)
    private_dir = folder / "private"
    private_dir.mkdir()
    command = [sys.executable, str(private_dir / "driver.py"), nodes.address, str(private_dir)]
    command.append(json.dumps(ENV_NAMES))
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if private:
        proc = run_private(
            command, private_dir, [(script, "driver.py")], nodes.driver_env(), cwd=ROOT, **pipes
        )
    else:
        (private_dir / "driver.py").write_text(DRIVER)
        proc = subprocess.Popen(command, env=nodes.driver_env(), cwd=ROOT, **pipes)
    try:
        first_line = proc.stdout.readline().strip()
        outside = sorted(p.name for p in private_dir.iterdir())  # while the driver is alive
        out, err = proc.communicate("go\n", timeout=DRIVER_LIMIT_S)
    finally:
        proc.kill()
    assert first_line == "WRITTEN" and proc.returncode == 0, f"{first_line}\n{out}\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1]), outside


@pytest.fixture(scope="module")
def first_probe(nodes, tmp_path_factory):
    """One driver run against `nodes` (private when unshare works here): (result, what its
    private folder held seen from outside, whether it was private)."""
    result, outside = _run_driver(nodes, tmp_path_factory.mktemp("driver"), nodes.private)
    return result, outside, nodes.private


def test_private_driver_joins_and_its_task_runs_on_the_worker_blind_to_its_files(
    nodes, first_probe
):
    result, outside, private = first_probe
    if not private:
        pytest.skip(unshare_reason())
    assert outside == [], "the driver's private tmpfs showed outside its mount namespace"
    assert result["node_id"] == nodes.first.node_id != nodes.head.node_id
    assert result["driver_node_id"] == nodes.head.node_id  # Ray attaches a driver to the head
    assert len(result["driver_sees"]) == 2 and all(result["driver_sees"].values()), result
    assert result["task_sees"] == {path: False for path in result["driver_sees"]}, result


def _assert_node_local(nodes: RayNodes, node, cache_file: str) -> None:
    """The task's file is in `node`'s cache; for a private node, at that path only on the node."""
    assert Path(cache_file).parent == node.cache_dir
    assert (node.host_dir / "cache" / Path(cache_file).name).is_file()
    if nodes.private:
        assert not Path(cache_file).exists(), f"{cache_file} of a private node seen outside it"


def test_worker_processes_carry_the_nodes_environment(nodes, first_probe):
    _assert_node_local(nodes, nodes.first, first_probe[0]["cache_file"])
    env = first_probe[0]["env"]
    assert env[CACHE_ENV] == str(nodes.first.cache_dir) == f"{nodes.root}/node-1/cache"
    assert env["HOME"] == str(nodes.first.home)
    assert {name: env[name] for name in TEST_CREDENTIALS} == TEST_CREDENTIALS
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
