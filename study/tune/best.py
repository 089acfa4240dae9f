"""After the searches: each backbone's best trial evaluated once on the test split, and optional
reseeding.

The best trial is picked from the finished trials by the space's validation metric only. Its model
(the trial's best epoch, saved before the report that could have stopped it) is reloaded from
`model.keras` and evaluated on the test split exactly once: `best/<backbone>/selection.json` records
which trial was evaluated, and a later `--resume` does not evaluate the same selection again.

`final_seeds: N` retrains the chosen configuration with N other seeds (test split evaluated for
each) and writes `best/<backbone>/seeds.json` with the mean and spread, so a reader can tell a
backbone's advantage from seed noise.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import ray

from fer.core import names
from fer.core.files import write_json
from study.space import Space
from study.tune.ledger import Ledger
from study.tune.trainable import Evaluator, evaluate_best, retrain_seed

SELECTION = names.SELECTION_FILE


def _remote(fn, cpus: float, gpus: float):
    return ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus or 0, max_retries=0)


class EvaluatorPool:
    """Evaluator actors (study.tune.trainable.Evaluator) with a trial's resources, at most `limit`
    (the backbones).

    `fill(free)` starts actors on slots no trial will take any more, so their start-up overlaps the
    last trials; `evaluate_bests` tops the pool up to what it needs and hands each backbone to one
    actor."""

    def __init__(self, cpus: float, gpus: float, threads: int, limit: int):
        self.cpus, self.gpus, self.threads, self.limit = cpus, gpus, threads, limit
        self.actors: list = []
        self.assigned: dict[str, int] = {}  # backbone -> index of the actor that evaluates it
        self.preloaded: dict[
            str, str
        ] = {}  # backbone -> trial folder its actor was asked to preload

    def actor_for(self, backbone: str):
        """The actor that evaluates `backbone` (the least busy one on first use); None without
        actors."""
        if not self.actors:
            return None
        if backbone not in self.assigned:
            load = [list(self.assigned.values()).count(i) for i in range(len(self.actors))]
            self.assigned[backbone] = load.index(min(load))
        return self.actors[self.assigned[backbone]]

    def preload(self, backbone: str, trial_dir: str) -> None:
        """Let the backbone's actor (if one runs) load the best finished trial so far (no test
        data)."""
        actor = self.actor_for(backbone)
        if actor is not None and self.preloaded.get(backbone) != trial_dir:
            self.preloaded[backbone] = trial_dir
            actor.preload.remote(trial_dir)

    def fill(self, free_slots: int) -> int:
        """Start actors on up to `free_slots` slots (never more than `limit` in all); return how
        many started."""
        started = 0
        while started < free_slots and len(self.actors) < self.limit:
            actor_cls = ray.remote(Evaluator).options(
                num_cpus=self.cpus, num_gpus=self.gpus or 0, max_restarts=0
            )
            self.actors.append(actor_cls.remote(self.threads))
            started += 1
        return started

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.assigned, self.preloaded = [], {}, {}


def _already_evaluated(best_dir: Path, trial_id: str) -> bool:
    path = best_dir / SELECTION
    return (
        path.exists()
        and (best_dir / names.TEST_METRICS_FILE).exists()
        and json.loads(path.read_text()).get("trial_id") == trial_id
    )


def evaluate_bests(
    space: Space,
    ledger: Ledger,
    study_dir: Path,
    data_dir: Path,
    cpus: float,
    gpus: float,
    threads: int,
    log: Callable[[str], None] = print,
    pool: EvaluatorPool | None = None,
    slots: int = 1,
) -> dict[str, dict]:
    """Evaluate every backbone's best trial on the test split, on up to `slots` Evaluator actors in
    parallel (those `pool` already started first; the pool is closed afterwards)."""
    study_dir = Path(study_dir)
    pool = pool or EvaluatorPool(cpus, gpus, threads, limit=len(space.backbones))
    try:
        return _evaluate_bests(
            space, ledger, study_dir, data_dir, cpus, gpus, threads, log, pool, slots
        )
    finally:
        pool.close()


def _evaluate_bests(space, ledger, study_dir, data_dir, cpus, gpus, threads, log, pool, slots):
    pending, summary, jobs = {}, {}, {}
    for backbone in space.backbones:
        best = ledger.best(backbone, space.metric, space.mode)
        best_dir = study_dir / names.BEST_DIR / backbone
        if best is None:
            log(f"{backbone}: no trial finished with a finite {space.metric}; nothing to evaluate")
            continue
        selection = {
            "trial_id": best["trial_id"],
            "metric": space.metric,
            "mode": space.mode,
            "metric_value": best["metric_value"],
            "best_epoch": best.get("best_epoch"),
            "status": best["status"],
        }
        if _already_evaluated(best_dir, best["trial_id"]):
            summary[backbone] = json.loads((best_dir / SELECTION).read_text())
            continue
        jobs[backbone] = (
            str(study_dir / best["trial_dir"]),
            str(best_dir),
            str(data_dir),
            threads,
            selection,
        )
    if jobs:
        pool.fill(max(0, min(len(jobs), slots) - len(pool.actors)))
    for backbone, args in jobs.items():
        pending[backbone] = (args[-1], pool.actor_for(backbone).evaluate.remote(*args))
    for backbone, (selection, ref) in pending.items():
        try:
            try:
                result = ray.get(ref)
            except (
                ray.exceptions.RayActorError
            ):  # the actor died (not the evaluation): once more in a task
                result = ray.get(_remote(evaluate_best, cpus, gpus).remote(*jobs[backbone]))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other backbones
            log(f"{backbone}: test evaluation of trial {selection['trial_id']} failed: {exc}")
            continue
        selection = result
        summary[backbone] = selection
        log(
            f"{backbone}: best trial {selection['trial_id']} ({space.metric} {selection['metric_value']:.4f}) "
            f"-> test accuracy {result.get('test_accuracy', float('nan')):.3f}, "
            f"macro F1 {result.get('test_macro_f1', float('nan')):.3f}"
        )
    return summary


def retrain_seeds(
    space: Space,
    study_dir: Path,
    data_dir: Path,
    cpus: float,
    gpus: float,
    threads: int,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Retrain each backbone's best config with `space.final_seeds` other seeds; write seeds.json."""
    if space.final_seeds <= 0:
        return {}
    study_dir = Path(study_dir)
    jobs = {}
    for backbone in space.backbones:
        best_dir = study_dir / names.BEST_DIR / backbone
        if not (best_dir / SELECTION).exists():
            continue
        config = json.loads((best_dir / names.CONFIG_FILE).read_text())
        for k in range(1, space.final_seeds + 1):
            seed = config["seed"] + k
            out = best_dir / "seeds" / f"seed-{seed}"
            done = out / names.SUMMARY_FILE
            if done.exists() and "test_accuracy" in json.loads(done.read_text()):
                jobs[(backbone, seed)] = json.loads(done.read_text())
                continue
            jobs[(backbone, seed)] = _remote(retrain_seed, cpus, gpus).remote(
                {**config, "seed": seed}, str(out), str(data_dir), threads
            )
    results: dict[str, dict] = {}
    for (backbone, seed), job in jobs.items():
        try:
            summary = job if isinstance(job, dict) else ray.get(job)
        except Exception as exc:  # noqa: BLE001
            log(f"{backbone}: retraining with seed {seed} failed: {exc}")
            continue
        results.setdefault(backbone, {})[seed] = {
            k: summary.get(k) for k in ("test_accuracy", "test_macro_f1", "val_loss", "epochs_run")
        }
    out = {}
    for backbone, per_seed in results.items():
        stats = {"seeds": per_seed}
        for key in ("test_accuracy", "test_macro_f1"):
            values = [v[key] for v in per_seed.values() if v.get(key) is not None]
            if values:
                stats[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
        write_json(study_dir / names.BEST_DIR / backbone / names.SEEDS_FILE, stats)
        out[backbone] = stats
        acc = stats.get("test_accuracy")
        if acc:
            log(
                f"{backbone}: {acc['n']} seeds, test accuracy {acc['mean']:.3f} +/- {acc['std']:.3f}"
            )
    return out
