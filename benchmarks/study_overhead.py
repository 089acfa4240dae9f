"""How much of a study's wall time is NOT trial training: Ray start, worker start-up, bookkeeping,
tests.

Runs a small study on demo data (local Ray, `--concurrency` trials at once with one CPU each; by
default 4 MobileNetV2@96 trials of 2 x 8 epochs on 130 images per class, about a minute of epochs
each on a quiet 2-core machine) and prints ONE JSON line: study wall time, the sum of the trials'
training times (their epochs, as reported), the overhead fraction = 1 - sum(train) / (wall x
concurrency), the same with each trial's whole worker time, the memory of an idle local Ray head
(the processes `fer-study run` starts, before any trial), and `breakdown`: the driver's phases
(study.json "timings"), each trial's steps (outcome.json "timing": slot hand-over gap, worker set-up
before the first epoch, time between epochs, wrap-up after the last report), each slot's idle tail
at the end of the search, and the machine's idle core-seconds per phase (what overlapping could
still fill; counts every process on the machine, so run it on a quiet one). Target: overhead < 15%
for ~1-minute trials.

    python3 benchmarks/study_overhead.py                   # ~4 minutes on 2 cores (+ ~30 s data,
    Ray memory) python3 benchmarks/study_overhead.py --epochs 1 --image-size 32 --trials 2
    --per-class 20   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ray_head_memory(num_cpus: int) -> dict:
    """RSS and PSS (MB) of the processes a local Ray head started by `fer-study run` runs, when
    idle."""
    import psutil
    import ray

    from study.tune.cluster import connect

    connect(None, num_cpus=num_cpus, dashboard=True)
    time.sleep(10)  # let the dashboard and its agents settle
    procs = psutil.Process().children(recursive=True)
    rss = pss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", 0)
    ray.shutdown()
    return {"processes": len(procs), "rss_mb": round(rss / 2**20), "pss_mb": round(pss / 2**20)}


class IdleSampler:
    """Samples the machine's idle CPU time (all cores, idle + iowait) every `period` seconds in a
    thread, so the breakdown can say how much of a phase's CPU capacity nobody used: time that
    overlapping could fill, as opposed to time that only less work can save. Counts every process on
    the machine."""

    def __init__(self, period: float = 0.25):
        import threading

        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while True:
            times = psutil.cpu_times()
            self.samples.append((time.time(), times.idle + getattr(times, "iowait", 0.0)))
            if self._stop.wait(self.period):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def idle_between(self, start: float | None, end: float | None) -> float | None:
        """Idle core-seconds between two unix times (linear between samples)."""
        import numpy as np

        if start is None or end is None or len(self.samples) < 2 or end <= start:
            return None
        t, idle = np.array(self.samples).T
        return round(float(np.interp(end, t, idle) - np.interp(start, t, idle)), 1)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 2) if values else None


def time_breakdown(
    timings: dict, outcomes: list[dict], wall: float, start_unix: float, slots: int
) -> dict:
    """Where the study's wall time went: the driver's phases (study.json "timings") and, per trial,
    its steps (outcome.json "timing"), with each concurrency slot's hand-over from one trial to the
    next."""
    phases = {
        key: timings.get(key) for key in ("connect_s", "search_s", "evaluate_s", "final_seeds_s")
    }
    known = sum(v for v in phases.values() if v)
    phases["other_in_run_study_s"] = round(
        timings.get("total_s", wall) - known, 1
    )  # study.json, Tuner set-up
    phases["after_run_study_s"] = round(wall - timings.get("total_s", wall), 1)  # Ray shutdown
    rows = sorted(
        (o["timing"] | {"trial_id": o["trial_id"]} for o in outcomes if o.get("timing")),
        key=lambda t: t["started_at"] or 0,
    )
    # slots: each trial takes the slot that was freed first (its previous trial's driver-side end)
    free = [timings.get("search_started_at") or start_unix] * slots
    for row in rows:
        slot = min(range(slots), key=lambda i: free[i])
        row["slot"] = slot
        row["gap_before_s"] = (
            round(row["started_at"] - free[slot], 3) if row["started_at"] else None
        )
        free[slot] = row["finished_at"]
    end = timings.get("search_ended_at")
    keys = (
        "gap_before_s",
        "worker_start_s",
        "setup_s",
        "epochs_s",
        "between_epochs_s",
        "report_wait_s",
        "wrap_up_s",
        "end_s",
    )
    return {
        "phases": phases,
        "per_trial_mean_s": {key: _mean(r.get(key) for r in rows) for key in keys},
        "slot_tail_idle_s": [round(end - t, 1) for t in free]
        if end
        else None,  # last trial end -> search end
        "trials": [{key: r.get(key) for key in ("trial_id", "slot") + keys} for r in rows],
    }


def fixed_costs(trials: list[dict], summaries: dict) -> float:
    """Adds each trial's fixed cost to its breakdown row and returns the study's compile excess
    (seconds).

    Fixed cost (issue 12): from its slot becoming free to the end of its first stage-1 step
    (hand-over gap, worker start, set-up, that first step), plus stage 2's first step above that
    stage's median step (its compilation). Compile excess: every stage's first step above its median
    step, summed over trials."""
    excess_total = 0.0
    for row in trials:
        summary = summaries.get(row["trial_id"], {})
        first, median = summary.get("first_step_s") or {}, summary.get("median_step_s") or {}
        excess = {stage: max(0.0, first[stage] - median.get(stage, 0.0)) for stage in first}
        excess_total += sum(excess.values())
        stages = list(first)
        if not stages or row.get("setup_s") is None:
            continue
        later = sum(excess[stage] for stage in stages[1:])
        parts = (
            row.get("gap_before_s") or 0.0,
            row.get("worker_start_s") or 0.0,
            row["setup_s"],
            first[stages[0]],
        )
        row["fixed_cost_s"] = round(sum(parts) + later, 2)
    return round(excess_total, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per stage")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=130, help="demo images per class")
    parser.add_argument(
        "--fresh-workers", action="store_true", help="run --fresh-workers (a process per trial)"
    )
    args = parser.parse_args()
    import resource

    import pandas as pd

    from benchmarks.demo_study import demo_study
    from fer.runtime.machine import machine_info
    from study.tune.driver import run_study

    memory = ray_head_memory(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study, space = demo_study(
            tmp,
            "bench",
            args.backbone,
            args.image_size,
            args.per_class,
            args.trials,
            epochs_head=args.epochs,
            epochs_finetune=args.epochs,
            patience=50,
        )
        with IdleSampler() as idle:
            t0, t0_unix = time.perf_counter(), time.time()
            run_study(
                study,
                space,
                cpus_per_trial=1,
                num_cpus=args.concurrency,
                dashboard=True,
                stream=sys.stderr,
                live=False,
                reuse_workers=not args.fresh_workers,
            )
            wall = time.perf_counter() - t0
            end_unix = time.time()
        trials = pd.read_csv(study / "trials.csv")
        study_json = json.loads((study / "study.json").read_text())
        search_s = study_json.get("search_s")
        outcomes = [
            json.loads(path.read_text())
            for path in sorted((study / "trials").glob("*/outcome.json"))
        ]
        summaries = {
            path.parent.name: json.loads(path.read_text())
            for path in (study / "trials").glob("*/summary.json")
        }
        timings = study_json.get("timings", {})
        breakdown = time_breakdown(timings, outcomes, wall, t0_unix, args.concurrency)
        compile_excess = fixed_costs(breakdown["trials"], summaries)
        search = (timings.get("search_started_at"), timings.get("search_ended_at"))
        breakdown["idle_core_s"] = {
            "before_search": idle.idle_between(t0_unix, search[0]),
            "search": idle.idle_between(*search),
            "after_search": idle.idle_between(search[1], end_unix),
            "whole_run": idle.idle_between(t0_unix, end_unix),
        }
    train = float(trials.train_s.sum())
    trial_wall = float(trials.trial_s.sum())
    print(
        json.dumps(
            {
                "benchmark": "study_overhead",
                "trials": len(trials),
                "statuses": trials.status.value_counts().to_dict(),
                "backbone": args.backbone,
                "image_size": args.image_size,
                "epochs": 2 * args.epochs,
                "concurrency": args.concurrency,
                "reuse_workers": not args.fresh_workers,
                "setup_s_per_trial": [o.get("timing", {}).get("setup_s") for o in outcomes],
                "cpu_s": {
                    "driver": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
                    "children": round(sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]), 1),
                },
                "load_average": os.getloadavg(),
                "study_wall_s": round(wall, 1),
                "search_wall_s": search_s,
                "trial_train_s_sum": round(train, 1),
                "trial_train_s_mean": round(train / len(trials), 1),
                "trial_wall_s_sum": round(trial_wall, 1),
                "overhead_fraction": round(1 - train / (wall * args.concurrency), 3),
                "orchestration_overhead_fraction": round(
                    1 - trial_wall / (wall * args.concurrency), 3
                ),
                "search_overhead_fraction": round(1 - train / (search_s * args.concurrency), 3)
                if search_s
                else None,
                # the issue-12 definition: first steps' excess over the median step (compilation) is
                # overhead too
                "overhead_fraction_with_compile": round(
                    1 - (train - compile_excess) / (wall * args.concurrency), 3
                ),
                "search_overhead_fraction_with_compile": round(
                    1 - (train - compile_excess) / (search_s * args.concurrency), 3
                )
                if search_s
                else None,
                "fixed_cost_s": [t.get("fixed_cost_s") for t in breakdown["trials"]],
                "breakdown": breakdown,
                "idle_ray_head": memory,
                "note": "overhead_fraction = 1 - sum(trial epoch times) / (study wall x "
                "concurrency): everything not spent in epochs (Ray start, worker + TensorFlow "
                "start-up, model build, bookkeeping, the final test evaluation). "
                "orchestration_overhead_fraction counts each trial's whole worker time (start-up "
                "included) as trial time: what Ray/Tune/fer-study add on top of the trials",
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
