"""The best-trial evaluation, where it runs: `evaluate_best` (a trial's model on the test split,
published as best/<backbone>/), the `Evaluator` actor that runs it in a process started ahead of
time, and the `EvaluatorPool` of those actors that the study keeps.

The study starts evaluators on slots that no trial will take any more (every trial has been handed
out and one has finished), so their start-up (a process, the TensorFlow import) and the loading and
timing of each backbone's best model so far run while the last trials finish, on cores that would
otherwise idle; the evaluation after the search then has only the test split left to run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

from fer.core import names
from fer.core.files import write_json
from study.tune.options import Resources
from study.tune.trainable import import_keras_lean


@dataclasses.dataclass(frozen=True)
class EvaluationJob:
    """One backbone's best trial to evaluate: its folder, where it is published, the study data,
    the backend's threads, and `selection` (which trial, by which metric: written with the results
    as selection.json)."""

    trial_dir: str
    best_dir: str
    data_dir: str
    threads: int
    selection: dict
    # with storage (a study.storage.home.StudyHome whose `remote` is true): trial_dir and best_dir
    # are relative to the study (`trials/<id>`, `best/<backbone>`), the trial is downloaded to
    # this node, the data is this node's copy, and best/<backbone>/ is published to the storage
    home: object | None = None

    @property
    def remote(self) -> bool:
        return self.home is not None and self.home.remote


def evaluate_best(job: EvaluationJob, model=None, latency: dict | None = None) -> dict:
    """Reload a trial's best model and evaluate it ONCE on the test split (and on val if the trial
    was stopped before writing val_metrics.json). Runs in an Evaluator actor (or a Ray task) with a
    trial's resources; `model`: the trial's model.keras already loaded by that process; `latency`:
    that model's deployment figures already measured (fer.deploy.latency), else they are measured
    here. The selection is written with the results in the same atomic step that publishes
    best/<backbone>/."""
    from fer.runtime.backend import configure_backend

    configure_backend(threads=job.threads)  # before the imports below load the backend
    from fer.core.config import load_config
    from fer.data import StudyData
    from fer.deploy.latency import LATENCY_FILE, measure_and_write
    from fer.evaluate.on_split import evaluate_split
    from fer.model.build import load_trained_model

    if job.remote:
        source, data_dir = job.home.pull(job.trial_dir), job.home.data()
        partial = job.home.local(job.best_dir + ".partial")
    else:
        source, data_dir = Path(job.trial_dir), job.data_dir
        partial = Path(job.best_dir).with_name(Path(job.best_dir).name + ".partial")
    tmp = _copy_trial(source, partial)
    config = load_config(tmp / names.CONFIG_FILE)
    if model is None:
        model = load_trained_model(tmp / names.MODEL_FILE)
    study_data = StudyData(data_dir)
    if not (tmp / names.VAL_METRICS_FILE).exists():
        evaluate_split(model, study_data, "val", config, tmp)
    result = evaluate_split(model, study_data, "test", config, tmp)
    # deployment figures, stored once (the report reads them)
    measure_and_write(model, tmp / LATENCY_FILE, job.threads, measured=latency)
    write_json(tmp / names.SELECTION_FILE, {**job.selection, **result})
    if job.remote:
        import shutil

        job.home.publish(tmp, job.best_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        _publish(tmp, Path(job.best_dir))
    return {**job.selection, **result}


def _copy_trial(src: Path, tmp: Path) -> Path:
    """A fresh `tmp` folder holding the trial's own files (names.TRIAL_FILES)."""
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in names.TRIAL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    return tmp


def _publish(tmp: Path, dst: Path) -> None:
    """best/<backbone>/ appears complete or not at all."""
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


class Preloaded(NamedTuple):
    """A finished trial an Evaluator loaded ahead of its evaluation."""

    trial_dir: str
    model: object
    latency: dict | None  # its deployment figures (fer.deploy.latency), None if they failed


class Evaluator:
    """A worker process for `evaluate_best` that starts (imports TensorFlow/Keras, sets threads)
    before it is asked to evaluate anything. It knows nothing of the test split until `evaluate` is
    called with the final best."""

    def __init__(self, threads: int):
        import_keras_lean()
        from fer.runtime.backend import configure_backend

        configure_backend(threads=threads)
        import keras

        import fer.core.config  # noqa: F401 - imported now, while the core is idle
        import fer.data  # noqa: F401
        import fer.train.trial  # noqa: F401

        # the backend's runtime starts here, not later
        keras.ops.convert_to_numpy(keras.ops.ones((1,)) + 1)
        self.threads = threads
        self.preloaded: Preloaded | None = None

    def preload(self, trial_dir: str, home=None) -> bool:
        """Load a finished trial's model, trace its predict step on blank images (no data is read)
        and take its deployment figures (fer.deploy.latency: timed on blank images too, the larger
        part of an evaluation), so that if this trial is still the best when the search ends, its
        evaluation only has the test split left to run. Called while the last trials run, on a core
        no trial will take, for the best finished trial so far; a later call replaces the model."""
        import numpy as np

        from fer.core.config import load_config
        from fer.data.batches import predict_probs
        from fer.deploy.latency import measure_safely
        from fer.model.build import load_trained_model

        if self.preloaded is not None and self.preloaded.trial_dir == trial_dir:
            return True
        self.preloaded = None
        try:
            # with storage, `trial_dir` is `trials/<id>` and comes to this node first
            local = home.pull(trial_dir) if home is not None and home.remote else Path(trial_dir)
            config = load_config(local / names.CONFIG_FILE)
            size, batch = config["image_size"], config["batch_size"]
            model = load_trained_model(local / names.MODEL_FILE)
            predict_probs(model, np.zeros((batch, size, size, 3), np.uint8), batch)
        except Exception:  # noqa: BLE001 - only a head start: evaluate() loads the model itself
            return False
        self.preloaded = Preloaded(trial_dir, model, measure_safely(model, self.threads))
        return True

    def evaluate(self, job: EvaluationJob) -> dict:
        """`evaluate_best`, with the preloaded model and figures when they are this job's trial's
        (they are used once)."""
        warm = self.preloaded
        self.preloaded = None
        if warm is None or warm.trial_dir != job.trial_dir:
            return evaluate_best(job)
        return evaluate_best(job, model=warm.model, latency=warm.latency)


class EvaluatorPool:
    """Evaluator actors with a trial's resources, at most `limit` (the backbones).

    `fill(free)` starts actors on slots no trial will take any more, so their start-up overlaps the
    last trials; study.tune.best.evaluate_bests tops the pool up to what it needs and hands each
    backbone to one actor."""

    def __init__(self, resources: Resources, limit: int):
        self.resources, self.limit = resources, limit
        self.actors: list = []
        self.assigned: dict[str, int] = {}  # backbone -> index of the actor that evaluates it
        self.preloaded: dict[str, str] = {}  # backbone -> trial its actor was asked to preload

    def actor_for(self, backbone: str):
        """The actor that evaluates `backbone` (the least busy one on first use); None without
        actors."""
        if not self.actors:
            return None
        if backbone not in self.assigned:
            load = [list(self.assigned.values()).count(i) for i in range(len(self.actors))]
            self.assigned[backbone] = load.index(min(load))
        return self.actors[self.assigned[backbone]]

    def preload(self, backbone: str, trial_dir: str, home=None) -> None:
        """Let the backbone's actor (if one runs) load the best finished trial so far (no test
        data); with storage (`home`), `trial_dir` is relative to the study."""
        actor = self.actor_for(backbone)
        if actor is not None and self.preloaded.get(backbone) != trial_dir:
            self.preloaded[backbone] = trial_dir
            actor.preload.remote(trial_dir, home)

    def fill(self, free_slots: int) -> int:
        """Start actors on up to `free_slots` slots (never more than `limit` in all); return how
        many started."""
        started = 0
        while started < free_slots and len(self.actors) < self.limit:
            actor_cls = self.resources.actor(Evaluator)
            self.actors.append(actor_cls.remote(self.resources.threads))
            started += 1
        return started

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.assigned, self.preloaded = [], {}, {}
