"""The same small study on one node and on nodes that share no disk (issue 22): what the storage
costs in wall time. One JSON line.

    python3 benchmarks/cluster_study.py [--trials 2] [--workers 2]

Runs search_spaces/smoke.yaml (two from-scratch CNNs at 48 px, `--trials` per backbone) on the
demo data twice, with the real `fer-study run`:
- `one_node`: a local Ray with as many CPUs as the workers below have together, study folder on
  local disk (today's path);
- `nodes_storage`: a token-auth head with 0 CPUs and `--workers` worker nodes of 1 CPU each
  (separate `ray start`s, private mount namespaces: tests/cluster_nodes.py), the driver in a private
  mount namespace, the study in a moto S3 server on loopback (`--storage`).
Both include preparing the data, the search, the test evaluation and (storage) shipping the data and
copying the trial folders. Needs root (unshare) and the test extra (moto). On one machine the nodes
share its CPUs, so this measures the storage layer's overhead, not a network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _space(work: Path, trials: int) -> Path:
    import yaml

    raw = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    raw["trials_per_backbone"] = trials
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _command(data: Path, space: Path, results: Path, *extra: str) -> list[str]:
    return (
        [sys.executable, "-m", "study.cli", "run", str(data), "--space", str(space)]
        + ["--name", "bench", "--results", str(results), "--group-regex", r"^(S\d+)_"]
        + ["--no-dashboard", *extra]
    )


def _timed(proc: subprocess.Popen) -> float:
    started = time.perf_counter()
    out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"study failed:\n{out[-3000:]}\n{err[-3000:]}")
    return round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from fer.prepare.demo_data import generate_demo_data
    from fer.runtime.machine import machine_info
    from tests.cluster_nodes import RayNodes, run_private, s3_node_env, unshare_reason
    from tests.s3_server import TEST_CREDENTIALS, S3Server

    reason = unshare_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    work = Path(tempfile.mkdtemp(prefix="fer-cluster-bench-"))
    data = work / "faces"
    generate_demo_data(data, seed=0)
    space = _space(work, args.trials)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    local = subprocess.Popen(
        _command(data, space, work / "local", "--num-cpus", str(args.workers)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    one_node_s = _timed(local)

    server = S3Server()
    server.create_bucket("bench")
    try:
        with RayNodes() as nodes:
            for _ in range(args.workers):
                nodes.add_worker(num_cpus=1, env=s3_node_env(), private=True)
            private = work / "driver"
            driver_env = nodes.driver_env(dict(env, **TEST_CREDENTIALS, HOME=str(private / "home")))
            driver_env["AWS_EC2_METADATA_DISABLED"] = "true"
            command = _command(data, space, private / "results", "--address", nodes.address)
            command += ["--storage", server.uri("bench", "studies")]
            driver = run_private(
                command,
                private,
                [(space, "space.yaml")],
                env=driver_env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            storage_s = _timed(driver)
    finally:
        server.stop()
    local_study = json.loads((work / "local" / "bench" / "study.json").read_text())
    print(
        json.dumps(
            {
                "benchmark": "cluster_study",
                "trials_per_backbone": args.trials,
                "workers": args.workers,
                "one_node_s": one_node_s,
                "nodes_storage_s": storage_s,
                "ratio": round(storage_s / one_node_s, 3),
                "one_node_trials": local_study.get("trials"),
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
