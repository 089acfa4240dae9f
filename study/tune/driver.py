"""`fer-study run`: a whole study, from data (or a prepared study folder) to best/<backbone>/ test
metrics.

Layout of `results/<study>/` (docs/results.md): study.json, data/, tune/ (Ray Tune's storage, one
folder per run attempt), optuna.sqlite3 (one Optuna study per backbone: `optuna-dashboard
sqlite:///.../optuna.sqlite3`), trials/<trial_id>/ (each trial's folder + outcome.json), trials.csv,
best/<backbone>/.

Resume (why not `Tuner.restore`): Tune snapshots its experiment state periodically (every 10 s or
more), so a driver killed between a trial's end and the next snapshot would run that trial again.
Instead, the facts a study needs are written the moment they happen: each trial's outcome
(study.tune.ledger.Ledger) and each Optuna ask/tell (SQLite). `--resume` reads them, marks trials
that were running at the kill as interrupted (their start points are queued again, their partial
folders removed), and starts a new Tuner whose per-backbone budgets are what is left. Completed
trials are neither repeated nor lost; the only work redone is the trials that were running at the
moment of the kill. Each backbone's ASHA rungs restart empty after a resume (a resumed trial is
compared only with trials that run after the resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from fer.core import names
from fer.core.config import PARAMS
from fer.core.errors import UserError
from fer.core.files import write_json
from study.space import Space, load_space
from study.tune.ledger import Ledger


class StudyIncomplete(Exception):
    """The searches stopped before every trial finished (Ctrl-C, or the cluster went away)."""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def resolve_study(
    source: str | Path,
    name: str | None,
    space: Space,
    results_root: Path,
    log: Callable[[str], None],
    group_regex: str | None = None,
) -> tuple[Path, Path]:
    """Return (study_dir, data_dir): use a prepared study folder as is, or prepare DATA into a new
    one."""
    from fer.data import StudyData
    from fer.prepare import prepare_dataset

    source = Path(source)
    if not source.exists():
        raise UserError(f"no such folder: {source}")
    if names.is_study_folder(source):
        study_dir = source
        if name and name != source.name:
            raise UserError(
                f"--name {name} given with the study folder {source}: drop --name to use it, "
                "or pass the class-folder DATA to start another study"
            )
    else:
        study_dir = Path(results_root) / (name or source.name)
    data_dir = study_dir / names.DATA_DIR
    if names.is_prepared_data(data_dir):
        StudyData(data_dir)  # fail early with a clear message if it is not readable
    elif study_dir == source:
        raise UserError(f"{source} is not a study folder")
    else:
        log(f"preparing {source} -> {data_dir}")
        size = min(
            space.image_sizes(space.backbones[0]) or [PARAMS["image_size"].default]
        )  # others: on first use
        prepare_dataset(
            source, data_dir, group_regex=group_regex, seed=space.seed, image_size=size, log=log
        )
    return study_dir.resolve(), data_dir.resolve()


def build_pixel_caches(space: Space, data_dir: Path, log: Callable[[str], None]) -> None:
    """Decode the train/val pixel caches of every image size the backbones use (per_backbone sizes)
    here, with a decoding pool, before trials start: a trial would otherwise build its size itself,
    in one process, inside its own timings (the test split's cache is built when the best models are
    evaluated)."""
    from fer.data import StudyData

    study_data = StudyData(data_dir)
    for size in sorted(
        {size for backbone in space.backbones for size in space.image_sizes(backbone)}
    ):
        for split in ("train", "val"):
            if not study_data.pixel_file(split, size).exists():
                log(f"building the {size}px pixel cache of the {split} split")
                study_data.pixels(split, size)


def _check_resume(study_dir: Path, space: Space, resume: bool) -> dict | None:
    study_json = study_dir / names.STUDY_FILE
    if not names.has_study_results(study_dir):
        if resume:
            raise UserError(
                f"--resume: {study_dir} holds no study to resume (no {names.STUDY_FILE})"
            )
        return None
    previous = json.loads(study_json.read_text()) if study_json.is_file() else {}
    if not resume:
        raise UserError(
            f"{study_dir} already holds a study; add --resume to continue it, or start another "
            "one with DATA --name NEW (or `fer-study prepare DATA --study NEW` first)"
        )
    old, new = previous.get("space", {}), space.to_dict()
    for key in new:
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(new[key], sort_keys=True):
            raise UserError(
                f"--resume: the space's '{key}' differs from the one the study started with; "
                "resume with the same search-space file"
            )
    return previous


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """How a study runs: `fer-study run`'s options. `trainable` replaces the Keras trial (tests of
    placement use a trivial one); everything else is the code path real studies take."""

    name: str | None = None  # results/NAME/ (default: DATA's folder name)
    results_root: str | Path = "results"
    group_regex: str | None = None  # when DATA is prepared here
    resume: bool = False
    address: str | None = None  # an existing Ray cluster; None: a local Ray
    num_cpus: int | None = None  # of the local Ray (default: all)
    num_gpus: int | None = None
    dashboard: bool = True
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 if the cluster has GPUs, else 0
    stream: TextIO | None = None  # progress output (default: stdout)
    live: bool | None = None  # a live progress view (default: when stream is a terminal)
    command: str | None = None  # recorded in study.json (default: this process's argv)
    trainable: Callable | None = None
    naive_split: int = 0  # split seeds of study.naive_split after the study (0: none)
    max_retries: int = (
        2  # times a trial whose worker or node died is run again (our own errors: never)
    )
    reuse_workers: bool = (
        True  # a trial slot keeps its worker process (imported Keras, its model, compiled stages)
    )


def run_study(
    source: str | Path, space_path: str | Path, options: StudyOptions | None = None, **overrides
) -> Path:
    """Run (or resume) a study; return its folder. See the module docstring for what it writes.

    `options` (a `StudyOptions`), with keyword `overrides` of its fields, e.g.
    `run_study(data, space, cpus_per_trial=2, resume=True)`.
    """
    opts = dataclasses.replace(options or StudyOptions(), **overrides)
    stream = opts.stream or sys.stdout

    def log(message: str) -> None:
        stream.write(message + "\n")
        stream.flush()

    space = load_space(space_path)
    if opts.cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be > 0, got {opts.cpus_per_trial}")
    if opts.gpus_per_trial is not None and opts.gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial must be >= 0, got {opts.gpus_per_trial}")
    if (
        isinstance(opts.max_retries, bool)
        or not isinstance(opts.max_retries, int)
        or opts.max_retries < 0
    ):
        raise UserError(f"--max-retries must be a whole number >= 0, got {opts.max_retries!r}")
    if opts.naive_split and opts.naive_split < 2:
        raise UserError(
            f"--naive-split needs at least 2 split seeds for a spread, got {opts.naive_split}"
        )
    study_dir, data_dir = resolve_study(
        source, opts.name, space, Path(opts.results_root), log, opts.group_regex
    )
    previous = _check_resume(study_dir, space, opts.resume)
    build_pixel_caches(space, data_dir, log)

    import ray

    from study.tune import cluster as tune_cluster

    ray_was_running = ray.is_initialized()
    run_started = time.perf_counter()
    preload = _preload_modules()  # while Ray starts (mostly waiting on its processes), in a thread
    info = tune_cluster.connect(
        opts.address, num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, dashboard=opts.dashboard
    )
    preload.join()
    timings = {"connect_s": round(time.perf_counter() - run_started, 1)}
    try:
        log(tune_cluster.describe_dashboard(info))
        tune_cluster.check_shared_storage(study_dir)
        gpus = (
            tune_cluster.default_gpus_per_trial()
            if opts.gpus_per_trial is None
            else float(opts.gpus_per_trial)
        )
        tune_cluster.check_trial_fits(opts.cpus_per_trial, gpus)
        if opts.trainable is None:
            tune_cluster.check_backend_sees_gpus(gpus)
        study = dict(previous or {})
        study.update(
            {
                "name": study_dir.name,
                "space_file": str(space_path),
                "space": space.to_dict(),
                "seed": space.seed,
                "data": str(data_dir),
                "status": names.STUDY_RUNNING,
                "command": opts.command or " ".join(shlex.quote(a) for a in sys.argv),
                "resources_per_trial": {"cpu": opts.cpus_per_trial, "gpu": gpus},
                "ray": info,
            }
        )
        from fer.runtime.machine import machine_info

        study["machine"] = machine_info()
        study.setdefault("started_at", _now())
        study.setdefault("runs", []).append({"started_at": _now(), "resume": bool(opts.resume)})
        study["timings"] = timings  # this run's phases, in seconds
        write_json(study_dir / names.STUDY_FILE, study)

        ledger = Ledger(study_dir)
        pool = None
        if opts.trainable is None:
            from study.tune.best import EvaluatorPool
            from study.tune.trainable import trial_threads

            pool = EvaluatorPool(
                opts.cpus_per_trial,
                gpus,
                trial_threads(opts.cpus_per_trial),
                limit=len(space.backbones),
            )
        try:
            _search(
                space,
                study,
                study_dir,
                data_dir,
                ledger,
                opts.cpus_per_trial,
                gpus,
                opts.trainable,
                stream,
                opts.live,
                log,
                pool,
                max_retries=opts.max_retries,
                reuse_workers=opts.reuse_workers,
            )
        except BaseException:
            if pool is not None:
                pool.close()
            raise
        ledger = Ledger(study_dir)  # what is on disk is the truth
        if opts.trainable is None:
            from study.tune.best import evaluate_bests, retrain_seeds

            threads = trial_threads(opts.cpus_per_trial)
            t0 = time.perf_counter()
            study["best"] = evaluate_bests(
                space,
                ledger,
                study_dir,
                data_dir,
                opts.cpus_per_trial,
                gpus,
                threads,
                log,
                pool=pool,
                slots=tune_cluster.concurrent_trials(opts.cpus_per_trial, gpus),
            )
            timings["evaluate_s"] = round(time.perf_counter() - t0, 1)
            if not study["best"]:
                study["status"] = names.STUDY_FAILED
                write_json(study_dir / names.STUDY_FILE, study)
                errors = [o["error"] for o in ledger.outcomes.values() if o.get("error")]
                raise UserError(
                    f"no trial of any backbone finished successfully (see {study_dir / names.TRIALS_CSV})"
                    + (f"; first error: {errors[0]}" if errors else "")
                )
            if space.final_seeds:
                t0 = time.perf_counter()
                study["final_seeds"] = retrain_seeds(
                    space, study_dir, data_dir, opts.cpus_per_trial, gpus, threads, log
                )
                timings["final_seeds_s"] = round(time.perf_counter() - t0, 1)
            if opts.naive_split:
                from study.tune.naive_split import run_naive_split

                t0 = time.perf_counter()
                run_naive_split(
                    study_dir, data_dir, opts.naive_split, opts.cpus_per_trial, gpus, threads, log
                )
                timings["naive_split_s"] = round(time.perf_counter() - t0, 1)
        study["status"] = names.STUDY_COMPLETED
        study["finished_at"] = _now()
        study["trials"] = _counts(ledger)
        timings["total_s"] = round(
            time.perf_counter() - run_started, 1
        )  # connect to here (Ray shutdown not in)
        write_json(study_dir / names.STUDY_FILE, study)
        log(f"study finished: {study_dir} ({names.TRIALS_CSV}, {names.BEST_DIR}/)")
        log(f"search history: optuna-dashboard sqlite:///{study_dir / names.OPTUNA_FILE}")
        return study_dir
    finally:
        if info.get("started_here") and not ray_was_running:
            ray.shutdown()


def _preload_modules():
    """Import what the search needs (Ray Tune, Optuna, our Tune glue: about a second) in a thread,
    so it overlaps `ray.init`, which spends most of its seconds waiting for the processes it starts.
    """
    import importlib
    import threading

    def run() -> None:
        for name in (
            "ray.tune",
            "optuna",
            "study.tune.callback",
            "study.tune.search",
            "study.tune.best",
            "fer.runtime.machine",
        ):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the real import later reports any problem
                return

    thread = threading.Thread(target=run, name="fer-study-preload", daemon=True)
    thread.start()
    return thread


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


def _counts(ledger: Ledger) -> dict:
    counts: dict[str, int] = {}
    for outcome in ledger.outcomes.values():
        counts[outcome["status"]] = counts.get(outcome["status"], 0) + 1
    return counts


def _search(
    space: Space,
    study: dict,
    study_dir: Path,
    data_dir: Path,
    ledger: Ledger,
    cpus: float,
    gpus: float,
    trainable,
    stream,
    live,
    log,
    pool=None,
    max_retries: int = 2,
    reuse_workers: bool = True,
) -> None:
    """Run the Tune searches for whatever budget is left; raise StudyIncomplete if they stop early.

    `max_retries`: Tune runs a trial again (from scratch, same config) when its worker or node died,
    up to that many times; our own errors end the trial normally and are never retried
    (study.tune.trainable). `reuse_workers`: Tune's actor reuse: a slot's worker runs one trial
    after another, with Keras' state cleared in between (fer.train.trial.fresh_keras_state), instead
    of a new process per trial.

    `pool` (a study.tune.best.EvaluatorPool): once every trial has been handed out, each slot a
    finishing trial frees for good starts an evaluator, whose start-up then overlaps the trials
    still running."""
    import optuna
    from ray import tune

    from study.tune.callback import ProgressView, StudyCallback
    from study.tune.cluster import concurrent_trials
    from study.tune.search import (
        BackboneSearcher,
        discard_interrupted,
        make_scheduler,
        optuna_storage,
        optuna_study_name,
    )
    from study.tune.trainable import train_trial, trial_resources, trial_threads

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    removed = ledger.discard_unfinished_folders()
    if removed:
        log(
            f"discarded {len(removed)} trial(s) interrupted by the previous run: {', '.join(removed)}"
        )
    storage = optuna_storage(study_dir)
    requeue = {
        b: discard_interrupted(storage, optuna_study_name(space, b)) for b in space.backbones
    }
    done = ledger.finished_per_backbone()
    budgets = {b: max(0, space.trials_per_backbone - done.get(b, 0)) for b in space.backbones}
    existing = set(optuna.get_all_study_names(storage))
    fresh = {
        b: optuna_study_name(space, b) not in existing for b in space.backbones
    }  # start points queued once
    searcher = BackboneSearcher(space, budgets, storage, requeue=requeue, fresh=fresh)
    total = searcher.total()
    already = sum(done.values())
    if total == 0:
        log(f"all {already} trials already finished")
        return
    log(
        f"{total} trial(s) to run ({already} already finished): {space.trials_per_backbone} per backbone x "
        f"{len(space.backbones)} backbones, {cpus:g} CPU + {gpus:g} GPU per trial"
    )

    for warning in space.warnings():
        log(f"warning: {warning}")
    scheduler = make_scheduler(space)
    stopped = (
        (lambda tid: tid in scheduler.stopped) if scheduler is not None else (lambda tid: False)
    )
    view = ProgressView(
        total=space.trials_per_backbone * len(space.backbones),
        metric=space.metric,
        stream=stream,
        live=live,
    )
    for status, count in _counts(ledger).items():
        view.done[status] = count

    slots = concurrent_trials(cpus, gpus)
    finished = [0]

    def on_change() -> None:
        study["trials"] = _counts(ledger)
        write_json(study_dir / names.STUDY_FILE, study)
        finished[0] += 1
        handed_out = sum(searcher.suggested.values())
        if pool is not None and handed_out >= total:  # no trial will take a freed slot any more
            pool.fill(slots - (handed_out - finished[0]) - len(pool.actors))
            for backbone in space.backbones:  # the best so far may well be the final best: load it
                best = ledger.best(backbone, space.metric, space.mode)
                if best is not None:
                    pool.preload(backbone, str(study_dir / best["trial_dir"]))

    callback = StudyCallback(
        ledger,
        space.metric,
        space.mode,
        view,
        tuple(space.space),
        stopped=stopped,
        optuna_number=searcher.optuna_trial_number,
        on_change=on_change,
        on_retry=searcher.forget,
    )
    context = {
        "data_dir": str(data_dir),
        "trials_dir": str(ledger.trials_dir.resolve()),
        "study_log": str(
            (study_dir / names.STUDY_LOG).resolve()
        ),  # progress of one-off steps (caches)
        "threads": trial_threads(cpus),
        "metric": space.metric,  # an error's last report carries it
        # the reports after which a trial may be stopped (none without a scheduler): it saves its
        # best model before those only, and at its end
        "decision_epochs": scheduler.decision_epochs() if scheduler is not None else [],
        "reuse_workers": bool(
            reuse_workers
        ),  # a warm worker also keeps its model (fer.train.trial reuse_model)
    }
    os.environ.setdefault(
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"
    )  # our ledger replaces Tune's CSV/JSON
    os.environ.setdefault(
        "RAY_AIR_NEW_OUTPUT", "0"
    )  # with verbose=0: no Tune tables, our view instead
    fn = tune.with_parameters(trainable or train_trial, context=context)
    run_index = (
        len(list((study_dir / "tune").glob("run-*"))) + 1 if (study_dir / "tune").exists() else 1
    )
    tuner = tune.Tuner(
        tune.with_resources(fn, trial_resources(cpus, gpus)),
        # max_concurrent_trials: Tune starts one trial at a time with a custom searcher unless told
        # how many may be pending, which serialises short trials behind each worker's start-up.
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=total,
            reuse_actors=bool(reuse_workers),
            max_concurrent_trials=slots,
        ),
        run_config=tune.RunConfig(
            name=f"run-{run_index}",
            storage_path=str(study_dir / "tune"),
            callbacks=[callback],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=max_retries, fail_fast=False),
        ),
    )
    t0 = time.time()
    import signal
    import threading

    sigint = signal.getsignal(signal.SIGINT)
    try:
        with _quiet_tune():
            tuner.fit()
    finally:
        # Tune leaves its own SIGINT handler behind, which would make Ctrl-C in the evaluations,
        # final_seeds or --naive-split after the search print a warning instead of stopping
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
    study.setdefault("search_s", 0.0)
    study["search_s"] = round(study["search_s"] + time.time() - t0, 1)  # all runs together
    study.setdefault("timings", {}).update(
        search_s=round(time.time() - t0, 1),  # this run
        search_started_at=round(t0, 3),
        search_ended_at=round(time.time(), 3),
    )
    left = {
        b: space.trials_per_backbone - n
        for b, n in Ledger(study_dir).finished_per_backbone().items()
    }
    missing = sum(max(0, left.get(b, space.trials_per_backbone)) for b in space.backbones)
    if missing:
        study["status"] = names.STUDY_INTERRUPTED
        write_json(study_dir / names.STUDY_FILE, study)
        raise StudyIncomplete(
            f"{missing} trial(s) did not finish; continue with the same command plus --resume"
        )
