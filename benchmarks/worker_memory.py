"""Does a warm (reused) trial worker's memory stay flat? Runs N tiny trials one after another in ONE
reused worker (`run --reuse-workers`, one CPU) and prints ONE JSON line: the worker's resident
memory after each trial (worker_times.json `rss_mb`), the growth from the end of the second trial to
the last, and whether every trial ran in the same process. Target (issue 12): growth <= 50 MB over
20 trials.

    python3 benchmarks/worker_memory.py                 # 20 trials, smallcnn at 32 px, 1+1 epochs
    (~3-4 min)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument(
        "--fresh-workers", action="store_true", help="a new process per trial (for comparison)"
    )
    args = parser.parse_args()

    from benchmarks.demo_study import demo_study
    from fer.runtime.machine import machine_info
    from study.tune.driver import run_study

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study, space = demo_study(
            tmp,
            "memory",
            args.backbone,
            args.image_size,
            args.per_class,
            args.trials,
            dense_units=16,
            epochs_head=1,
            epochs_finetune=1,
        )
        run_study(
            study,
            space,
            cpus_per_trial=1,
            num_cpus=1,
            dashboard=False,
            stream=sys.stderr,
            live=False,
            reuse_workers=not args.fresh_workers,
        )
        outcomes = sorted(
            (json.loads(p.read_text()) for p in (study / "trials").glob("*/outcome.json")),
            key=lambda o: o["finished_at"],
        )
        rss = []
        for outcome in outcomes:
            times = study / outcome["trial_dir"] / "worker_times.json"
            rss.append(json.loads(times.read_text()).get("rss_mb") if times.exists() else None)
    print(
        json.dumps(
            {
                "benchmark": "worker_memory",
                "backbone": args.backbone,
                "image_size": args.image_size,
                "trials": len(outcomes),
                "reuse_workers": not args.fresh_workers,
                "worker_pids": len({o.get("worker_pid") for o in outcomes}),
                "rss_mb": rss,
                "growth_after_second_mb": round(rss[-1] - rss[1], 1)
                if len(rss) > 1 and None not in rss
                else None,
                "statuses": sorted({o["status"] for o in outcomes}),
                "load_average": os.getloadavg(),
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
