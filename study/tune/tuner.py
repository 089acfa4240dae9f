"""The search: ONE Ray Tune run over what is left of every backbone's budget.

`run_search` reads what the study folder already holds (finished trials, Optuna's asks), builds the
per-backbone searcher and scheduler (study.tune.search), the callback that records each trial as it
ends (study.tune.callback) and the trial function with its `TrialContext` (study.tune.trainable),
runs `Tuner.fit`, and raises `StudyIncomplete` if it stopped before every trial finished. Ray Tune,
Optuna and the Tune glue are imported when the search runs, so the driver imports this module
cheaply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

from fer.core import names
from study.space import Space
from study.tune.ledger import Ledger
from study.tune.options import StudyOptions, StudyPlace, TrialContext
from study.tune.record import StudyRecord


class StudyIncomplete(Exception):
    """The searches stopped before every trial finished (Ctrl-C, or the cluster went away)."""


def run_search(
    space: Space, record: StudyRecord, place: StudyPlace, options: StudyOptions, pool=None
) -> None:
    """Run the Tune searches for whatever budget is left; raise StudyIncomplete if they stop early.

    `options.max_retries`: Tune runs a trial again (from scratch, same config) when its worker or
    node died, up to that many times; our own errors end the trial normally and are never retried
    (study.tune.trainable). `options.reuse_workers`: Tune's actor reuse: a slot's worker runs one
    trial after another, with Keras' state cleared in between (`fresh_keras_state`, see
    study.tune.trainable), instead of a new process per trial.

    `pool` (a study.tune.evaluator.EvaluatorPool): once every trial has been handed out, each slot a
    finishing trial frees for good starts an evaluator, whose start-up then overlaps the trials
    still running."""
    from study.tune.cluster import concurrent_trials
    from study.tune.search import make_scheduler

    ledger = Ledger(place.study_dir)
    searcher = _searcher_for_budget_left(space, ledger, place)
    place.mirror.push(names.OPTUNA_FILE)  # resume's settling of Optuna, before any trial
    total = searcher.total()
    if total == 0:
        place.log(f"all {sum(ledger.finished_per_backbone().values())} trials already finished")
        return
    _log_plan(space, ledger, place, total)
    scheduler = make_scheduler(space)
    slots = concurrent_trials(place.resources)  # trials at once, node by node
    on_trial_end = _OnTrialEnd(
        record, ledger, searcher, pool, space, place.study_dir, total, slots, place.home
    )
    callback = _callback(space, ledger, options, searcher, scheduler, on_trial_end, place)
    tuner = _tuner(space, place, options, searcher, scheduler, callback, slots)
    started = time.time()
    _fit(tuner)
    record.add_search_time(started, time.time())
    _check_every_trial_finished(space, place, record)


def _searcher_for_budget_left(space: Space, ledger: Ledger, place: StudyPlace):
    """Resume's bookkeeping, then the searcher: folders of trials a killed run left are removed, the
    Optuna trials they were evaluating are failed and their start points queued again, and each
    backbone's budget is what its finished trials leave."""
    import optuna

    from study.tune.search import (
        BackboneSearcher,
        discard_interrupted,
        optuna_storage,
        optuna_study_name,
    )

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    removed = ledger.discard_unfinished_folders()
    if place.storage_uri is not None:
        removed = sorted(set(removed) | set(_discard_unfinished_in_storage(ledger, place)))
    if removed:
        place.log(
            f"discarded {len(removed)} trial(s) interrupted by the previous run: "
            f"{', '.join(removed)}"
        )
    storage = optuna_storage(place.study_dir)
    study_names = {b: optuna_study_name(space, b) for b in space.backbones}
    # an Optuna trial whose outcome is recorded is told its value (storage: the outcome may have
    # reached it before the SQLite copy did); the others still running were interrupted
    told = {
        o["optuna_trial"]: o for o in ledger.outcomes.values() if o.get("optuna_trial") is not None
    }
    requeue = {
        b: discard_interrupted(
            storage,
            study_names[b],
            {n: o for n, o in told.items() if o["backbone"] == b},
        )
        for b in space.backbones
    }
    done = ledger.finished_per_backbone()
    budgets = {b: max(0, space.trials_per_backbone - done.get(b, 0)) for b in space.backbones}
    existing = set(optuna.get_all_study_names(storage))
    # start points are queued once, when a backbone's Optuna study is new
    fresh = {b: study_names[b] not in existing for b in space.backbones}
    return BackboneSearcher(space, budgets, storage, requeue=requeue, fresh=fresh)


def _discard_unfinished_in_storage(ledger: Ledger, place: StudyPlace) -> list[str]:
    """Trial folders in storage without an outcome (a killed run's): removed there too."""
    from study.storage import delete_prefix, list_files

    storage = place.home.storage()
    folders = {rel.split("/", 1)[0] for rel in list_files(storage, names.TRIALS_DIR)}
    removed = sorted(f for f in folders if f not in ledger.outcomes)
    for folder in removed:
        delete_prefix(storage, f"{names.TRIALS_DIR}/{folder}")
    return removed


def _log_plan(space: Space, ledger: Ledger, place: StudyPlace, total: int) -> None:
    already = sum(ledger.finished_per_backbone().values())
    resources = place.resources
    place.log(
        f"{total} trial(s) to run ({already} already finished): {space.trials_per_backbone} per "
        f"backbone x {len(space.backbones)} backbones, {resources.cpus:g} CPU + "
        f"{resources.gpus:g} GPU per trial"
    )
    for warning in space.warnings():
        place.log(f"warning: {warning}")


@dataclasses.dataclass
class _OnTrialEnd:
    """After each trial's outcome: study.json's counts; and once every trial has been handed out,
    evaluators on the slots no trial will take any more, each loading its backbone's best finished
    trial so far (it may well be the final best). Tune pickles it with the callback, so it holds
    no stream (no `StudyPlace.log`)."""

    record: StudyRecord
    ledger: Ledger
    searcher: object  # study.tune.search.BackboneSearcher
    pool: object | None  # study.tune.evaluator.EvaluatorPool
    space: Space
    study_dir: Path
    total: int  # trials this run hands out
    slots: int  # trials the cluster runs at once
    home: object | None = None  # study.storage.home.StudyHome
    finished: int = 0

    def __call__(self) -> None:
        self.record.count_trials(self.ledger)
        self.finished += 1
        handed_out = sum(self.searcher.suggested.values())
        if self.pool is None or handed_out < self.total:
            return
        running = handed_out - self.finished
        # the slots of the nodes alive now: a lost node's slots are no longer free
        from study.tune.cluster import concurrent_trials

        slots = min(self.slots, concurrent_trials(self.pool.resources))
        self.pool.fill(slots - running - len(self.pool.actors))
        for backbone in self.space.backbones:
            best = self.ledger.best(backbone, self.space.metric, self.space.mode)
            if best is None:
                continue
            if self.home is not None and self.home.remote:
                self.pool.preload(backbone, best["trial_dir"], self.home)
            else:
                self.pool.preload(backbone, str(self.study_dir / best["trial_dir"]))


def _callback(space, ledger, options, searcher, scheduler, on_trial_end, place: StudyPlace):
    """The driver-side recorder of each trial, with its progress view (and with storage, the
    mirror's pulls and pushes around each outcome)."""
    from study.tune.callback import StudyCallback, TrialHooks
    from study.tune.progress_view import ProgressView

    view = ProgressView(
        total=space.trials_per_backbone * len(space.backbones),
        metric=space.metric,
        stream=options.stream,
        live=options.live,
    )
    for status, count in ledger.status_counts().items():
        view.done[status] = count
    stopped = scheduler.stopped if scheduler is not None else set()  # no scheduler: none
    hooks = TrialHooks(
        stopped=stopped.__contains__,
        optuna_number=searcher.optuna_trial_number,
        on_change=on_trial_end,
        on_retry=_on_retry(searcher, on_trial_end.pool),
        **_mirror_hooks(place),
    )
    return StudyCallback(ledger, view, space, hooks)


def _on_retry(searcher, pool):
    """A trial's worker or node died and Tune runs it again: the searcher forgets the dead attempt,
    and evaluators started early give their slots back (on a cluster that lost a node, the retried
    trial would otherwise wait for a slot an idle evaluator holds, for ever); they are started again
    when the search is over."""

    def on_retry(trial_id: str) -> None:
        searcher.forget(trial_id)
        if pool is not None and pool.actors:
            pool.close()

    return on_retry


def _mirror_hooks(place: StudyPlace) -> dict:
    """With storage: the callback's hooks that keep storage and the driver's mirror in step (a
    storage hiccup is logged, never fatal to the bookkeeping; the next push carries the files)."""
    if place.storage_uri is None:
        return {}
    mirror, log = place.mirror, place.log

    def guarded(action: str, fn):
        def run(trial_id: str) -> None:
            try:
                fn(trial_id)
            except Exception as exc:  # noqa: BLE001
                log(f"warning: storage: {action} of trial {trial_id} failed: {exc}")

        return run

    return {
        "on_start": guarded("saving Optuna's asks", lambda t: mirror.push(names.OPTUNA_FILE)),
        "fetch_trial": guarded("copying the folder", mirror.pull_trial),
        "outcome_written": guarded("uploading the outcome", mirror.push_outcome),
    }


def _trial_context(space: Space, place: StudyPlace, options: StudyOptions, scheduler):
    return TrialContext(
        data_dir=str(place.data_dir),
        trials_dir=str((place.study_dir / names.TRIALS_DIR).resolve()),
        study_log=str((place.study_dir / names.STUDY_LOG).resolve()),
        threads=place.resources.threads,
        metric=space.metric,
        decision_epochs=scheduler.decision_epochs() if scheduler is not None else {},
        reuse_workers=bool(options.reuse_workers),
        home=place.home,
    )


def _tuner(space, place, options, searcher, scheduler, callback, slots: int):
    """The Tuner: the trial function with its context and resources, one run folder per attempt
    (tune/run-<n>/), Tune's own loggers and tables off (our ledger and view replace them)."""
    from ray import tune

    from study.tune.trainable import train_trial

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # our ledger: Tune's CSV/JSON
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our view
    context = _trial_context(space, place, options, scheduler)
    trainable = tune.with_parameters(options.trainable or train_trial, context=context)
    storage_path, storage_filesystem, run_index = _tune_storage(place)
    return tune.Tuner(
        tune.with_resources(trainable, place.resources.tune_request()),
        # max_concurrent_trials: Tune starts one trial at a time with a custom searcher unless told
        # how many may be pending, which serialises short trials behind each worker's start-up.
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=searcher.total(),
            reuse_actors=bool(options.reuse_workers),
            max_concurrent_trials=slots,
        ),
        run_config=tune.RunConfig(
            name=f"run-{run_index}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=[callback],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=options.max_retries, fail_fast=False),
        ),
    )


def _tune_storage(place: StudyPlace) -> tuple[str, object, int]:
    """Tune's own storage (`tune/`, one `run-<n>` per attempt): the study folder's, or with
    storage the same storage's (its filesystem passed along: an endpoint override is kept)."""
    if place.storage_uri is None:
        tune_dir = place.study_dir / "tune"
        run_index = len(list(tune_dir.glob("run-*"))) + 1 if tune_dir.exists() else 1
        return str(tune_dir), None, run_index
    from study.storage import list_files

    storage = place.home.storage()
    runs = {rel.split("/", 1)[0] for rel in list_files(storage, "tune")}
    run_index = len({r for r in runs if r.startswith("run-")}) + 1
    return storage.path("tune"), storage.fs, run_index


def _fit(tuner) -> None:
    """`tuner.fit()`, quietly, with the caller's Ctrl-C handler back afterwards: Tune leaves its own
    SIGINT handler behind, which would make Ctrl-C in the evaluations, final_seeds or --naive-split
    after the search print a warning instead of stopping."""
    import signal
    import threading

    sigint = signal.getsignal(signal.SIGINT)
    try:
        with _quiet_tune():
            tuner.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)


@contextlib.contextmanager
def _quiet_tune():
    """Tune logs every trial error with its traceback; our progress view and trials.csv already say
    it."""
    logger = logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_every_trial_finished(space: Space, place: StudyPlace, record: StudyRecord) -> None:
    """Count the outcomes on disk (the truth); any backbone short of its budget: interrupted."""
    finished = Ledger(place.study_dir).finished_per_backbone()
    left = {b: space.trials_per_backbone - n for b, n in finished.items()}
    missing = sum(max(0, left.get(b, space.trials_per_backbone)) for b in space.backbones)
    if missing:
        record.mark_interrupted()
        raise StudyIncomplete(
            f"{missing} trial(s) did not finish; continue with the same command plus --resume"
        )
