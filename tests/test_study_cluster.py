"""Placement on a multi-node cluster: two simulated Ray nodes with logical GPUs, fractional GPU
trials.

The trials are a trivial function trainable (a Keras trial per simulated node would take minutes),
but everything around it is the real `run_study` path: the per-backbone searcher and scheduler, the
per-trial resource request, joining a running cluster by address, the shared-storage check across
nodes, the ledger.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import ray.cloudpickle as cloudpickle
import yaml
from ray import tune
from ray.cluster_utils import Cluster

from study.tune.driver import run_study

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(
    sys.modules[__name__]
)  # workers cannot import this test module


TRIALS = 4


def placement_probe(config, context):  # context: a study.tune.options.TrialContext
    """Record where the trial ran and with which resources, wait (holding them) until all TRIALS
    trials are running at once (a barrier, so slow worker start-up on a busy machine cannot fake or
    hide concurrency), then report two epochs like a real trial."""
    runtime = ray.get_runtime_context()
    trial_id = tune.get_context().get_trial_id()
    barrier = Path(context.trials_dir).parent / "barrier"
    barrier.mkdir(exist_ok=True)
    (barrier / trial_id).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < TRIALS and time.time() < deadline:
        time.sleep(0.2)
    out = Path(context.trials_dir) / trial_id
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(
        json.dumps(
            {
                "node": runtime.get_node_id(),
                "resources": runtime.get_assigned_resources(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "running_together": len(list(barrier.iterdir())),
            }
        )
    )
    for epoch in (1, 2):
        tune.report({"epoch": epoch, "val_loss": config["dropout"] + 1.0 / epoch})


@pytest.fixture
def two_node_cluster():
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 1,
            "object_store_memory": 80 * 2**20,
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()
    try:  # run_study joins it through --address, as `fer-study run --address HOST:PORT` does
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_trials_spread_over_two_nodes_with_half_a_gpu_each(two_node_cluster, new_study, tmp_path):
    folder = new_study("cluster")
    space_file = tmp_path / "cluster.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "name": "cluster",
                "backbones": ["mobilenet025", "mobilenetv2"],
                "trials_per_backbone": 2,
                "scheduler": {"type": "none"},
                "fixed": {"image_size": 32, "weights": "none"},
                "space": {"dropout": {"uniform": [0.1, 0.6]}},
            }
        )
    )
    run_study(
        folder,
        space_file,
        address=two_node_cluster.address,
        cpus_per_trial=0.5,
        gpus_per_trial=0.5,
        trainable=placement_probe,
        live=False,
    )

    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == TRIALS and set(trials.status) == {"completed"}
    probes = [
        json.loads((folder / "trials" / t / "probe.json").read_text()) for t in trials.trial_id
    ]
    assert len({p["node"] for p in probes}) == 2  # both nodes ran trials
    for probe in probes:
        assert probe["resources"]["GPU"] == pytest.approx(0.5)
        assert probe["resources"]["CPU"] == pytest.approx(0.5)
        assert len(probe["gpu_ids"]) == 1
    # 2 nodes x (1 GPU / 0.5) = all four trials at once: each saw the other three running
    assert [p["running_together"] for p in probes] == [TRIALS] * TRIALS
    study = json.loads((folder / "study.json").read_text())
    assert study["ray"]["nodes"] == 2 and study["resources_per_trial"] == {"cpu": 0.5, "gpu": 0.5}


def test_a_local_study_runs_its_trials_at_the_users_priority():
    """Ray starts workers 15 nice levels down; connect() keeps a local study's trials at the
    driver's level. Its workers also start with 2 malloc arenas (docs/pitfalls.md#malloc-arenas)."""
    probe = (
        "import os, ray\n"
        "from study.tune.cluster import connect\n"
        "connect(None, num_cpus=1, dashboard=False)\n"
        "print('nice', os.nice(0), ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
        "env = ray.remote(lambda name: os.environ.get(name))\n"
        "print('arenas', ray.get(env.remote('MALLOC_ARENA_MAX')))\n"
        "print('reuse wait', ray.get(env.remote('TUNE_FUNCTION_THREAD_TIMEOUT_S')))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_worker_niceness", "MALLOC_ARENA_MAX", "TUNE_FUNCTION_THREAD_TIMEOUT_S")
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("nice ")), None)
    assert line is not None, done.stderr[-2000:]
    driver, worker = line.split()[1:]
    assert worker == driver
    assert "arenas 2" in done.stdout.splitlines(), done.stdout[-2000:]
    # Tune's default 2 s: too short
    assert "reuse wait 120" in done.stdout.splitlines(), done.stdout[-2000:]


def test_a_local_studys_first_trials_use_the_workers_ray_prestarted():
    """A job runtime env would make every slot's first trial wait for a new worker process;
    connect() gives a local Ray's workers their environment by inheritance instead, so Ray's
    prestarted workers are used (the trial actor's process is older than the actor), and the
    driver's own environment is left as it was."""
    probe = (
        "import os, time, psutil, ray\n"
        "from study.tune.cluster import connect\n"
        "connect(None, num_cpus=1, dashboard=False)\n"
        "time.sleep(3)\n"  # let the prestarted worker come up
        "submitted = time.time()\n"
        # Tune runs each trial in an actor like this one
        "def env(self): return os.getpid(), os.environ.get('MALLOC_ARENA_MAX')\n"
        "Trial = ray.remote(num_cpus=1)(type('Trial', (), {'env': env}))\n"
        "pid, arenas = ray.get(Trial.remote().env.remote())\n"
        "age = submitted - psutil.Process(pid).create_time()\n"
        "print('age', age, arenas, os.environ.get('MALLOC_ARENA_MAX'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("age ")), None)
    assert line is not None, done.stderr[-2000:]
    age, worker_arenas, driver_arenas = line.split()[1:]
    # started with Ray, not for this actor (a new process is <1 s old when it answers)
    assert float(age) > 2
    assert worker_arenas == "2" and driver_arenas == "None"
