"""Do two concurrent trials on two cores each run as fast as one lone trial on one core? One JSON
line.

    python3 benchmarks/concurrent_trials.py [--backbone mobilenetv2] [--image-size 96] [--epochs 4]
        [--images 600] [--path loop|fit|both]

Prepares demo data once, then runs real trials (`run_trial`, both stages) in fresh processes with
one thread each (FER_THREADS=1): one alone, then two at the same time. Each trial's steady training
images/s (its summary's `images_per_s`, each stage's first step excluded) over the lone trial's is
the figure (target >= 0.95; 0.84 with Keras's `fit` under TensorFlow, whose per-epoch tf.data
teardown leaves a core idle: docs/benchmarks.md). `--path fit` runs the trials with `fit`
(fer.train.fit_loop with loop=False), `loop` with the trial's default, `both` one after the other.
Measure on an otherwise idle machine with as many cores as concurrent trials (2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = """
import functools, json, sys
from fer.runtime.backend import configure_backend
configure_backend(1)
from fer.data import StudyData
from fer.train import fit_loop, trial
if sys.argv[3] == "fit":
    trial.fit_stage = functools.partial(fit_loop.fit_stage, loop=False)
summary = trial.run_trial(json.loads(sys.argv[1]), StudyData(sys.argv[2]), sys.argv[4])
print(json.dumps({"images_per_s": summary["images_per_s"], "epochs": summary["epochs_run"]}))
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="mobilenetv2")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=600, help="demo images (about 70%% train)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per stage")
    p.add_argument("--path", choices=("loop", "fit", "both"), default="both")
    return p.parse_args()


def run_trials(n: int, config: dict, data_dir: Path, path: str, out: Path) -> list[dict]:
    """`n` trials at the same time, each in its own one-thread process; their summaries."""
    env = dict(os.environ, FER_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                json.dumps(config),
                str(data_dir),
                path,
                str(out / str(i)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for i in range(n)
    ]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"a trial process failed (exit {proc.returncode})")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def measure(config: dict, data_dir: Path, path: str, tmp: Path) -> dict:
    lone = run_trials(1, config, data_dir, path, tmp / f"{path}-lone")[0]["images_per_s"]
    pair = [r["images_per_s"] for r in run_trials(2, config, data_dir, path, tmp / f"{path}-pair")]
    return {
        "lone_images_per_s": round(lone, 1),
        "concurrent_images_per_s": [round(x, 1) for x in pair],
        "fraction_of_lone": [round(x / lone, 3) for x in pair],
    }


def main():
    args = parse_args()
    from fer.core.config import make_config
    from fer.prepare import prepare_dataset
    from fer.prepare.demo_data import generate_demo_data
    from fer.runtime.machine import machine_info

    config = make_config(
        backbone=args.backbone,
        image_size=args.image_size,
        weights="none",
        batch_size=args.batch_size,
        epochs_head=args.epochs,
        epochs_finetune=args.epochs,
        patience=args.epochs + 1,  # every epoch runs
    )
    paths = ("fit", "loop") if args.path == "both" else (args.path,)
    with tempfile.TemporaryDirectory(prefix="fer-concurrent-") as tmp:
        tmp = Path(tmp)
        generate_demo_data(tmp / "demo", per_class=max(2, args.images // 5), seed=0)
        prepare_dataset(
            tmp / "demo", tmp / "data", image_size=args.image_size, log=lambda *a, **k: None
        )
        results = {path: measure(config, tmp / "data", path, tmp) for path in paths}
    line = {
        "benchmark": "concurrent_trials",
        "backbone": args.backbone,
        "image_size": args.image_size,
        "epochs_per_stage": args.epochs,
        **results,
        "target_fraction": 0.95,
        "machine": machine_info(),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
