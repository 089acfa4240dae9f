"""The typed objects a study is run with: `StudyOptions` (`fer-study run`'s options), and what the
driver derives from them and hands on: `Resources` (what one trial holds), `StudyPlace` (the study
folder at work, for every step after the search) and `TrialContext` (what every trial worker gets).

They replace long parameter lists and an untyped dict, so one place says what crosses from the
driver into the steps after the search and into each Ray worker. Ray is imported only where a task
or an actor is made, so building these costs nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from fer.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class StudyOptions:
    """How a study runs: `fer-study run`'s options. `trainable` replaces the Keras trial (tests of
    placement use a trivial one, called with the trial's config and its `TrialContext`); everything
    else is the code path real studies take."""

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
    storage: str | None = None  # the study's home in object storage: URI/<study> (--storage URI)
    naive_split: int = 0  # split seeds of study.naive_split after the study (0: none)
    # times a trial whose worker or node died is run again (our own errors: never)
    max_retries: int = 2
    # a trial slot keeps its worker process (imported Keras, its model, compiled stages)
    reuse_workers: bool = True

    def check(self) -> None:
        """Refuse values no study can run with, naming the option to fix."""
        if self.cpus_per_trial <= 0:
            raise UserError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise UserError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        retries = self.max_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise UserError(f"--max-retries must be a whole number >= 0, got {retries!r}")
        if self.storage and str(self.address or "").startswith("ray://"):
            raise UserError(
                "--storage with a Ray Client address (ray://...) is not supported: run the driver "
                "on a machine that reaches the cluster (--address HOST:6379) or submit it with "
                "`ray job submit` (docs/cluster.md)"
            )
        if self.naive_split and self.naive_split < 2:
            raise UserError(
                f"--naive-split needs at least 2 split seeds for a spread, got {self.naive_split}"
            )


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one trial holds, and so does every evaluation or retraining that stands in for one:
    `cpus` (fractions allowed) and `gpus` (fractions share a device)."""

    cpus: float
    gpus: float

    @property
    def threads(self) -> int:
        """The backend's thread count: the whole CPUs held, at least one."""
        return max(1, int(math.floor(self.cpus + 1e-9)))

    def tune_request(self) -> dict:
        """The request `tune.with_resources` takes (no GPU key without a GPU share)."""
        request = {"cpu": float(self.cpus)}
        if self.gpus:
            request["gpu"] = float(self.gpus)
        return request

    def task(self, fn):
        """`fn` as a Ray task holding these resources; never retried (a failed evaluation or
        retraining is reported, and the study goes on)."""
        import ray

        return ray.remote(fn).options(num_cpus=self.cpus, num_gpus=self.gpus or 0, max_retries=0)

    def actor(self, cls):
        """`cls` as a Ray actor class holding these resources; never restarted."""
        import ray

        return ray.remote(cls).options(num_cpus=self.cpus, num_gpus=self.gpus or 0, max_restarts=0)


@dataclasses.dataclass(frozen=True)
class StudyPlace:
    """A study folder at work: its prepared data, what each of its trials and tasks holds, and where
    progress lines go. What the steps after the search (best-trial evaluation, final_seeds, the
    naive split) all need."""

    study_dir: Path
    data_dir: Path
    resources: Resources
    log: Callable[[str], None] = print
    storage_uri: str | None = None  # the study's root in storage (`--storage`); None: none

    @property
    def home(self):
        """The study as workers see it (study.storage.home.StudyHome)."""
        from study.storage.home import StudyHome

        return StudyHome(str(self.study_dir), str(self.data_dir), self.storage_uri)

    @property
    def mirror(self):
        """The driver's side of a stored study (study.storage.mirror.StudyMirror; no-ops without
        storage)."""
        from study.storage.mirror import StudyMirror

        return StudyMirror(self.home)


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial worker is handed besides its config (`tune.with_parameters`): paths, never
    arrays, since each trial memory-maps the shared pixel cache (fer.data.StudyData)."""

    data_dir: str  # the prepared study data
    trials_dir: str  # each trial writes <trials_dir>/<trial_id>/
    study_log: str  # progress of one-off steps (caches)
    threads: int  # the backend's threads (Resources.threads)
    metric: str  # an error's last report carries it (as NaN)
    # per backbone, ASHA's rung clock ("epoch" or "finetune_epoch") and the points on it after
    # whose report a trial may be stopped (none without a scheduler): it saves its best model before
    # those reports only, and at its end (study.tune.search.PerBackboneScheduler.decision_epochs)
    decision_epochs: dict = dataclasses.field(default_factory=dict)
    # a warm worker also keeps its model for the next trial (fer.train.trial reuse_model)
    reuse_workers: bool = True
    # where the study's files are (study.storage.home.StudyHome); with storage, the paths above
    # are the driver's and a trial uses its node-local folder and data copy instead
    home: object | None = None
