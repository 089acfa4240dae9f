"""`fer-study run`: a whole study, from data (or a prepared study folder) to best/<backbone>/ test
metrics.

Layout of `results/<study>/` (docs/results.md): study.json, data/, tune/ (Ray Tune's storage, one
folder per run attempt), optuna.sqlite3 (one Optuna study per backbone: `optuna-dashboard
sqlite:///.../optuna.sqlite3`), trials/<trial_id>/ (each trial's folder + outcome.json), trials.csv,
best/<backbone>/.

`run_study` reads top-down: the study folder (prepared here if DATA is a class folder), its record
(study.json, study.tune.record), Ray, the search (study.tune.tuner), then each backbone's best trial
on the test split (study.tune.best), final_seeds and the naive split (study.tune.naive_split).

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
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fer.core import names
from fer.core.config import PARAMS
from fer.core.errors import UserError
from fer.core.study_folder import StudyFolder
from study.space import Space, load_space
from study.tune.ledger import Ledger
from study.tune.options import Resources, StudyOptions, StudyPlace
from study.tune.record import StudyRecord
from study.tune.tuner import StudyIncomplete, run_search

__all__ = [
    "StudyIncomplete",
    "StudyOptions",
    "build_pixel_caches",
    "locate_study",
    "resolve_study",
    "run_study",
]


def run_study(
    source: str | Path, space_path: str | Path, options: StudyOptions | None = None, **overrides
) -> Path:
    """Run (or resume) a study; return its folder. See the module docstring for what it writes.

    `options` (a `StudyOptions`), with keyword `overrides` of its fields, e.g.
    `run_study(data, space, cpus_per_trial=2, resume=True)`.
    """
    opts = dataclasses.replace(options or StudyOptions(), **overrides)
    log = _printer(opts.stream or sys.stdout)
    space = load_space(space_path)
    opts.check()
    if opts.storage:
        return _run_stored(source, space_path, space, opts, log)
    from study.storage import is_storage_uri

    if is_storage_uri(source):
        raise UserError(f"{source} is a storage URI: add --storage ROOT (the URI it is under)")
    study_dir = locate_study(source, opts.name, Path(opts.results_root))
    with _driver_lease(study_dir):
        return _run_leased(source, study_dir, space_path, space, opts, log)


def _run_stored(source, space_path, space: Space, opts: StudyOptions, log) -> Path:
    """A study whose home is `--storage URI` (study.storage): checked before anything else, the
    lease taken there, the study's state brought into the local mirror (`results/<study>/`) when
    the storage already holds it (a resume, possibly on another machine), then the same study as a
    local one, with the mirror pushing what it writes."""
    from study.storage import check_storage, is_storage_uri, open_storage, read_json
    from study.storage.location import study_name_in
    from study.storage.mirror import LEASE_FILE, pull_study
    from study.tune.lease import StudyLease

    root = open_storage(opts.storage)
    if is_storage_uri(source):
        name = study_name_in(root, str(source))
        if opts.name and opts.name != name:
            raise UserError(f"--name {opts.name} given with the stored study {source}: drop --name")
        study_dir = Path(opts.results_root) / name
    else:
        study_dir = locate_study(source, opts.name, Path(opts.results_root))
    check_storage(root)
    storage = root.child(study_dir.name)
    with StudyLease(storage.fs, storage.path(LEASE_FILE), where=storage.uri):
        if read_json(storage, names.STUDY_FILE) is not None:
            if not opts.resume:
                raise UserError(
                    f"{storage.uri} already holds a study; add --resume to continue it, or start "
                    "another one with --name NEW"
                )
            log(f"bringing the study from {storage.uri} into {study_dir}")
            pull_study(storage, study_dir)
        elif is_storage_uri(source):
            raise UserError(f"{storage.uri} holds no study (no {names.STUDY_FILE}) to resume")
        elif names.has_study_results(study_dir):
            raise UserError(
                f"{study_dir} holds a study that is not in {storage.uri}: run it without "
                "--storage, or start another one with --name NEW"
            )
        target = study_dir if is_storage_uri(source) else source
        return _run_leased(target, study_dir, space_path, space, opts, log, storage)


def _run_leased(
    source, study_dir: Path, space_path, space: Space, opts: StudyOptions, log, storage=None
) -> Path:
    """The study itself, once this driver holds its lease (study.tune.lease); `storage` (a
    study.storage.StudyStorage rooted at the study) where it lives in storage."""
    study_dir, data_dir = resolve_study(source, study_dir, space, log, opts.group_regex)
    record = StudyRecord.open(study_dir, space, opts.resume)
    # with storage the test split's caches too: a node's copy has the caches, not the images
    build_pixel_caches(space, data_dir, log, with_test=storage is not None)
    if storage is not None:
        _ship(storage, data_dir, record, log)
    with _ray_for(opts) as ray_run:
        place = _place_trials(study_dir, data_dir, opts, ray_run.info, log, storage)
        record.start_run(
            space_path,
            space,
            place,
            ray_run.info,
            command=opts.command or " ".join(shlex.quote(a) for a in sys.argv),
            resume=opts.resume,
            connect_s=ray_run.connect_s,
        )
        ledger = _search_and_evaluate(space, record, place, opts)
        # from connecting to Ray to here (Ray's shutdown not in)
        record.mark_completed(ledger, round(time.perf_counter() - ray_run.started, 1))
        log(f"study finished: {study_dir} ({names.TRIALS_CSV}, {names.BEST_DIR}/)")
        log(f"search history: optuna-dashboard sqlite:///{study_dir / names.OPTUNA_FILE}")
        return study_dir


def _ship(storage, data_dir: Path, record: StudyRecord, log) -> None:
    """The prepared data (pixel caches included) to the storage once, for every node; every write
    of study.json from now on also goes there."""
    from study.storage import ship_data
    from study.storage.mirror import StudyMirror

    started = time.perf_counter()
    mebibytes = sum(p.stat().st_size for p in data_dir.rglob("*") if p.is_file()) / 2**20
    log(f"shipping the prepared data ({mebibytes:.1f} MiB) to {storage.uri}")
    ship_data(storage, data_dir)
    record.ship_s = round(time.perf_counter() - started, 1)
    mirror = StudyMirror(_home(storage, record.path.parent, data_dir))
    record.after_write = lambda: mirror.push(names.STUDY_FILE, names.STUDY_LOG)


def _home(storage, study_dir: Path, data_dir: Path):
    from study.storage.home import StudyHome

    return StudyHome(str(study_dir), str(data_dir), storage.uri)


def _printer(stream) -> Callable[[str], None]:
    def log(message: str) -> None:
        stream.write(message + "\n")
        stream.flush()

    return log


def resolve_study(
    source: str | Path,
    study_dir: Path,
    space: Space,
    log: Callable[[str], None],
    group_regex: str | None = None,
) -> tuple[Path, Path]:
    """Return (study_dir, data_dir) for the folder `locate_study` chose: a prepared study folder as
    it is, or a new one DATA is prepared into."""
    from fer.data import StudyData

    source = Path(source)
    data_dir = StudyFolder(study_dir).data_dir
    if names.is_study_folder(study_dir):
        StudyData(data_dir)  # fail early with a clear message if it is not readable
    elif study_dir == source:
        raise UserError(f"{source} is not a study folder")
    else:
        _prepare(source, data_dir, space, group_regex, log)
    return study_dir.resolve(), data_dir.resolve()


def locate_study(source: str | Path, name: str | None, results_root: Path) -> Path:
    """The study folder `fer-study run SOURCE [--name NAME]` runs in (nothing written): SOURCE
    itself where it is a study folder, else results_root/(NAME or SOURCE's name)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"no such folder: {source}")
    if names.is_study_folder(source):
        if name and name != source.name:
            raise UserError(
                f"--name {name} given with the study folder {source}: drop --name to use it, "
                "or pass the class-folder DATA to start another study"
            )
        return source
    return Path(results_root) / (name or source.name)


@contextlib.contextmanager
def _driver_lease(study_dir: Path):
    """Hold the study's lease (one driver per study, study.tune.lease) while the study runs; a
    study folder this driver created and left empty (it failed before writing) is removed."""
    from study.tune.lease import StudyLease

    created = not study_dir.exists()
    try:
        with StudyLease.in_folder(study_dir):
            yield
    finally:
        if created and study_dir.is_dir() and not any(study_dir.iterdir()):
            study_dir.rmdir()


def _prepare(source: Path, data_dir: Path, space: Space, group_regex, log) -> None:
    """Prepare the class folders of DATA into the new study's data/, with the pixel cache of the
    first backbone's smallest image size (the other sizes: on first use)."""
    from fer.prepare import prepare_dataset

    log(f"preparing {source} -> {data_dir}")
    size = min(space.image_sizes(space.backbones[0]) or [PARAMS["image_size"].default])
    prepare_dataset(
        source, data_dir, group_regex=group_regex, seed=space.seed, image_size=size, log=log
    )


def build_pixel_caches(
    space: Space, data_dir: Path, log: Callable[[str], None], with_test: bool = False
) -> None:
    """Decode the train/val pixel caches of every image size the backbones use (per_backbone sizes)
    here, with a decoding pool, before trials start: a trial would otherwise build its size itself,
    in one process, inside its own timings (the test split's cache is built when the best models are
    evaluated, unless `with_test`: nodes that get the data from storage have no images to decode;
    a cache is not an evaluation)."""
    from fer.data import StudyData

    study_data = StudyData(data_dir)
    sizes = {size for backbone in space.backbones for size in space.image_sizes(backbone)}
    for size in sorted(sizes):
        for split in ("train", "val", "test") if with_test else ("train", "val"):
            if not study_data.pixel_file(split, size).exists():
                log(f"building the {size}px pixel cache of the {split} split")
                study_data.pixels(split, size)


@dataclasses.dataclass(frozen=True)
class _RayRun:
    info: dict  # what study.json records as `ray` (study.tune.cluster.connect)
    started: float  # time.perf_counter() when connecting began: this run's timings start here
    connect_s: float  # seconds to start or join Ray


@contextlib.contextmanager
def _ray_for(opts: StudyOptions):
    """Ray for this study: a local one started here (shut down at the end), a cluster joined by
    address, or the one this process already runs (left as it is)."""
    import ray

    from study.tune import cluster as tune_cluster

    ray_was_running = ray.is_initialized()
    started = time.perf_counter()
    preload = _preload_modules()  # while Ray starts (mostly waiting on its processes), in a thread
    info = tune_cluster.connect(
        opts.address, num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, dashboard=opts.dashboard
    )
    preload.join()
    connect_s = round(time.perf_counter() - started, 1)
    try:
        yield _RayRun(info, started, connect_s)
    finally:
        if info.get("started_here") and not ray_was_running:
            ray.shutdown()


def _preload_modules():
    """Import what the search needs (Ray Tune, Optuna, our Tune glue) in a thread, so it overlaps
    `ray.init`, which spends most of its time waiting for the processes it starts."""
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


def _place_trials(
    study_dir: Path, data_dir: Path, opts: StudyOptions, ray_info: dict, log, storage=None
) -> StudyPlace:
    """Where the study runs and what each trial holds, once the cluster is known to run it: every
    node sees the study folder (or the study lives in `storage`), one node at least fits a trial,
    and the backend can use the GPUs a trial asks for (default: one GPU per trial where the cluster
    has GPUs)."""
    from study.tune import cluster as tune_cluster

    log(tune_cluster.describe_dashboard(ray_info))
    if storage is None:
        tune_cluster.check_shared_storage(study_dir)
    if opts.gpus_per_trial is None:
        gpus = tune_cluster.default_gpus_per_trial()
    else:
        gpus = float(opts.gpus_per_trial)
    resources = Resources(opts.cpus_per_trial, gpus)
    tune_cluster.check_trial_fits(resources)
    if opts.trainable is None:
        tune_cluster.check_backend_sees_gpus(gpus)
    storage_uri = storage.uri if storage is not None else None
    return StudyPlace(study_dir, data_dir, resources, log, storage_uri)


def _search_and_evaluate(
    space: Space, record: StudyRecord, place: StudyPlace, opts: StudyOptions
) -> Ledger:
    """The search, then (with the Keras trial) the steps after it; returns the trials on disk."""
    pool = None
    if opts.trainable is None:
        from study.tune.evaluator import EvaluatorPool

        pool = EvaluatorPool(place.resources, limit=len(space.backbones))
    try:
        run_search(space, record, place, opts, pool)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    ledger = Ledger(place.study_dir)  # what is on disk is the truth
    if opts.trainable is None:
        _after_search(space, record, place, ledger, pool, opts.naive_split)
    return ledger


def _after_search(space, record: StudyRecord, place: StudyPlace, ledger, pool, naive_split: int):
    """Each backbone's best trial on the test split (the study fails if there is none), then
    final_seeds and the naive split if asked for; each step timed in study.json."""
    from study.tune.best import evaluate_bests, retrain_seeds
    from study.tune.cluster import concurrent_trials

    with record.timed("evaluate_s"):
        slots = concurrent_trials(place.resources)
        record.set_best(evaluate_bests(space, ledger, place, pool=pool, slots=slots))
    if not record.best:
        record.mark_failed()
        errors = [o["error"] for o in ledger.outcomes.values() if o.get("error")]
        raise UserError(
            "no trial of any backbone finished successfully "
            f"(see {place.study_dir / names.TRIALS_CSV})"
            + (f"; first error: {errors[0]}" if errors else "")
        )
    if space.final_seeds:
        with record.timed("final_seeds_s"):
            record.set_final_seeds(retrain_seeds(space, place))
    if naive_split:
        from study.tune.naive_split import run_naive_split

        with record.timed("naive_split_s"):
            run_naive_split(place, naive_split)
