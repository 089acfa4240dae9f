"""After the searches: each backbone's best trial evaluated once on the test split, and optional
reseeding.

The best trial is picked from the finished trials by the space's validation metric only. Its model
(the trial's best epoch, saved before the report that could have stopped it) is reloaded from
`model.keras` and evaluated on the test split exactly once (study.tune.evaluator):
`best/<backbone>/selection.json` records which trial was evaluated, and a later `--resume` does not
evaluate the same selection again.

`final_seeds: N` retrains the chosen configuration with N other seeds (test split evaluated for
each) and writes `best/<backbone>/seeds.json` with the mean and spread, so a reader can tell a
backbone's advantage from seed noise.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import NamedTuple

import ray

from fer.core import names
from fer.core.files import write_json
from study.space import Space
from study.tune.evaluator import EvaluationJob, EvaluatorPool, evaluate_best
from study.tune.ledger import Ledger
from study.tune.options import StudyPlace
from study.tune.trainable import retrain_seed

SELECTION = names.SELECTION_FILE
SEED_KEYS = ("test_accuracy", "test_macro_f1", "val_loss", "epochs_run")  # seeds.json, per seed


def evaluate_bests(
    space: Space,
    ledger: Ledger,
    place: StudyPlace,
    pool: EvaluatorPool | None = None,
    slots: int = 1,
) -> dict[str, dict]:
    """Evaluate every backbone's best trial on the test split, on up to `slots` Evaluator actors in
    parallel (those `pool` already started first; the pool is closed afterwards). Returns each
    backbone's selection with its test results (study.json's `best`)."""
    pool = pool or EvaluatorPool(place.resources, limit=len(space.backbones))
    try:
        summary, jobs = _selections(space, ledger, place)
        if jobs:
            pool.fill(max(0, min(len(jobs), slots) - len(pool.actors)))
        pending = {b: pool.actor_for(b).evaluate.remote(job) for b, job in jobs.items()}
        for backbone, ref in pending.items():
            result = _evaluated(ref, jobs[backbone], place)
            if result is None:
                continue
            place.mirror.pull_published(f"{names.BEST_DIR}/{backbone}")
            summary[backbone] = result
            place.log(
                f"{backbone}: best trial {result['trial_id']} ({space.metric} "
                f"{result['metric_value']:.4f}) -> test accuracy "
                f"{result.get('test_accuracy', float('nan')):.3f}, "
                f"macro F1 {result.get('test_macro_f1', float('nan')):.3f}"
            )
        return summary
    finally:
        pool.close()


def _selections(space: Space, ledger: Ledger, place: StudyPlace):
    """Each backbone's best finished trial: the results of one evaluated earlier (same trial), or a
    job to evaluate it. Returns ({backbone: results}, {backbone: EvaluationJob})."""
    summary, jobs = {}, {}
    for backbone in space.backbones:
        best = ledger.best(backbone, space.metric, space.mode)
        best_dir = place.study_dir / names.BEST_DIR / backbone
        if best is None:
            place.log(
                f"{backbone}: no trial finished with a finite {space.metric}; nothing to evaluate"
            )
            continue
        if _already_evaluated(best_dir, best["trial_id"]):
            summary[backbone] = json.loads((best_dir / SELECTION).read_text())
            continue
        selection = {
            "trial_id": best["trial_id"],
            "metric": space.metric,
            "mode": space.mode,
            "metric_value": best["metric_value"],
            "best_epoch": best.get("best_epoch"),
            "status": best["status"],
        }
        remote = place.storage_uri is not None  # paths relative to the study (storage)
        jobs[backbone] = EvaluationJob(
            trial_dir=best["trial_dir"] if remote else str(place.study_dir / best["trial_dir"]),
            best_dir=f"{names.BEST_DIR}/{backbone}" if remote else str(best_dir),
            data_dir=str(place.data_dir),
            threads=place.resources.threads,
            selection=selection,
            home=place.home if remote else None,
        )
    return summary, jobs


def _already_evaluated(best_dir: Path, trial_id: str) -> bool:
    path = best_dir / SELECTION
    return (
        path.exists()
        and (best_dir / names.TEST_METRICS_FILE).exists()
        and json.loads(path.read_text()).get("trial_id") == trial_id
    )


def _evaluated(ref, job: EvaluationJob, place: StudyPlace) -> dict | None:
    """The actor's evaluation; once more in a task if the actor died (not the evaluation); None
    (reported) if it failed, so the other backbones go on."""
    backbone = Path(job.best_dir).name
    try:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError:
            return ray.get(place.resources.task(evaluate_best).remote(job))
    except Exception as exc:  # noqa: BLE001 - report and go on with the other backbones
        trial_id = job.selection["trial_id"]
        place.log(f"{backbone}: test evaluation of trial {trial_id} failed: {exc}")
        return None


class Retraining(NamedTuple):
    """A retraining running as a Ray task, and the folder (relative to the study) it writes."""

    ref: object
    out_rel: str
    place: StudyPlace


def retrain(place: StudyPlace, config: dict, out_rel: str, data_prefix: str = names.DATA_DIR):
    """A retraining of `config` into the study's `out_rel` (test split evaluated), on the prepared
    data `data_prefix` names: its summary when an earlier run finished it, else the `Retraining`
    that runs it now (`finished` waits for either)."""
    done = place.study_dir / out_rel / names.SUMMARY_FILE
    if done.exists() and "test_accuracy" in json.loads(done.read_text()):
        return json.loads(done.read_text())
    task = place.resources.task(retrain_seed)
    ref = task.remote(config, place.home, out_rel, data_prefix, place.resources.threads)
    return Retraining(ref, out_rel, place)


def finished(job) -> dict:
    """A `retrain` job's summary (waiting for its task if it runs; with storage, its folder is
    then copied into the driver's mirror)."""
    if isinstance(job, dict):
        return job
    summary = ray.get(job.ref)
    job.place.mirror.pull(job.out_rel)
    return summary


def retrain_seeds(space: Space, place: StudyPlace) -> dict[str, dict]:
    """Retrain each backbone's best config with `space.final_seeds` other seeds; write seeds.json.
    Returns each backbone's seeds.json (study.json's `final_seeds`)."""
    if space.final_seeds <= 0:
        return {}
    per_seed: dict[str, dict] = {}
    for (backbone, seed), job in _seed_jobs(space, place).items():
        try:
            summary = finished(job)
        except Exception as exc:  # noqa: BLE001
            place.log(f"{backbone}: retraining with seed {seed} failed: {exc}")
            continue
        per_seed.setdefault(backbone, {})[seed] = {k: summary.get(k) for k in SEED_KEYS}
    out = {}
    for backbone, seeds in per_seed.items():
        stats = _seed_stats(seeds)
        seeds_rel = f"{names.BEST_DIR}/{backbone}/{names.SEEDS_FILE}"
        write_json(place.study_dir / seeds_rel, stats)
        place.mirror.push(seeds_rel)
        out[backbone] = stats
        acc = stats.get("test_accuracy")
        if acc:
            place.log(
                f"{backbone}: {acc['n']} seeds, test accuracy {acc['mean']:.3f} +/- "
                f"{acc['std']:.3f}"
            )
    return out


def _seed_jobs(space: Space, place: StudyPlace) -> dict:
    """{(backbone, seed): retraining} for every evaluated backbone: its best config with the seeds
    after its own."""
    jobs = {}
    for backbone in space.backbones:
        best_dir = place.study_dir / names.BEST_DIR / backbone
        if not (best_dir / SELECTION).exists():
            continue
        config = json.loads((best_dir / names.CONFIG_FILE).read_text())
        for k in range(1, space.final_seeds + 1):
            seed = config["seed"] + k
            out = f"{names.BEST_DIR}/{backbone}/seeds/seed-{seed}"
            jobs[(backbone, seed)] = retrain(place, {**config, "seed": seed}, out)
    return jobs


def _seed_stats(per_seed: dict) -> dict:
    """seeds.json: each seed's results, and the mean and spread of the test metrics."""
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
    return stats
