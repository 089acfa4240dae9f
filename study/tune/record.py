"""`study.json`: what a study is, how it runs and how far it got (fields: docs/results.md).

`StudyRecord` owns the file: every change and every write of study.json goes through its methods,
so the moments it is written are all here. It is written (whole, atomically) when a run starts,
after each trial's outcome (its counts by status), when the search stops before every trial
finished (interrupted), when no trial of any backbone succeeded (failed), and when the run
completes. A resumed study keeps the previous runs' fields and adds its own run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import time
from pathlib import Path

from fer.core import names
from fer.core.errors import UserError
from fer.core.files import write_json
from study.space import Space
from study.tune.ledger import Ledger
from study.tune.options import StudyPlace


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class StudyRecord:
    """A study folder's study.json, in memory and on disk."""

    def __init__(self, study_dir: Path, previous: dict | None = None):
        self.path = Path(study_dir) / names.STUDY_FILE
        self._study = dict(previous or {})
        # with storage: each write also goes there (study.tune.driver); seconds the data took
        self.after_write = None
        self.ship_s: float | None = None

    @classmethod
    def open(cls, study_dir: Path, space: Space, resume: bool) -> StudyRecord:
        """The record of a new study, or, with `resume`, of the one the folder holds (started with
        the same space). A folder that holds a study is never written to without `resume`."""
        if not names.has_study_results(study_dir):
            if resume:
                raise UserError(
                    f"--resume: {study_dir} holds no study to resume (no {names.STUDY_FILE})"
                )
            return cls(study_dir)
        path = Path(study_dir) / names.STUDY_FILE
        previous = json.loads(path.read_text()) if path.is_file() else {}
        if not resume:
            raise UserError(
                f"{study_dir} already holds a study; add --resume to continue it, or start another "
                "one with DATA --name NEW (or `fer-study prepare DATA --study NEW` first)"
            )
        _check_same_space(previous.get("space", {}), space.to_dict())
        return cls(study_dir, previous)

    @property
    def best(self) -> dict:
        return self._study.get("best") or {}

    def start_run(
        self,
        space_path: str | Path,
        space: Space,
        place: StudyPlace,
        ray_info: dict,
        *,
        command: str,
        resume: bool,
        connect_s: float,
    ) -> None:
        """A run starts: what the study is, where and how it runs (`connect_s`: the seconds Ray
        took to start or join); write."""
        from fer.runtime.machine import machine_info

        resources = place.resources
        self._study.update(
            {
                "name": place.study_dir.name,
                "space_file": str(space_path),
                "space": space.to_dict(),
                "seed": space.seed,
                "data": str(place.data_dir),
                "status": names.STUDY_RUNNING,
                "command": command,
                "resources_per_trial": {"cpu": resources.cpus, "gpu": resources.gpus},
                "ray": ray_info,
                "storage": place.storage_uri,  # the URI as given: credentials never are in it
            }
        )
        self._study["machine"] = machine_info()
        self._study.setdefault("started_at", _now())
        self._study.setdefault("runs", []).append({"started_at": _now(), "resume": bool(resume)})
        self._study["timings"] = {"connect_s": connect_s}  # this run's phases, in seconds
        if self.ship_s is not None:
            self._study["timings"]["ship_data_s"] = self.ship_s
        self._write()

    def count_trials(self, ledger: Ledger) -> None:
        """A trial's outcome was written: the counts by status; write."""
        self._study["trials"] = ledger.status_counts()
        self._write()

    def add_search_time(self, started: float, ended: float) -> None:
        """The Tune run took `started` to `ended` (unix times): `search_s` over all runs, and this
        run's timings."""
        self._study.setdefault("search_s", 0.0)
        self._study["search_s"] = round(self._study["search_s"] + ended - started, 1)
        self._study.setdefault("timings", {}).update(
            search_s=round(ended - started, 1),
            search_started_at=round(started, 3),
            search_ended_at=round(ended, 3),
        )

    @contextlib.contextmanager
    def timed(self, key: str):
        """This run's `timings[key]`: the seconds the block took, when it ends without an error."""
        started = time.perf_counter()
        yield
        self._study.setdefault("timings", {})[key] = round(time.perf_counter() - started, 1)

    def set_best(self, best: dict[str, dict]) -> None:
        self._study["best"] = best

    def set_final_seeds(self, final_seeds: dict[str, dict]) -> None:
        self._study["final_seeds"] = final_seeds

    def mark_interrupted(self) -> None:
        """The search stopped before every trial finished; write."""
        self._study["status"] = names.STUDY_INTERRUPTED
        self._write()

    def mark_failed(self) -> None:
        """No trial of any backbone finished successfully; write."""
        self._study["status"] = names.STUDY_FAILED
        self._write()

    def mark_completed(self, ledger: Ledger, total_s: float) -> None:
        """The run is done (`total_s`: from connecting to Ray to here); write."""
        self._study["status"] = names.STUDY_COMPLETED
        self._study["finished_at"] = _now()
        self._study["trials"] = ledger.status_counts()
        self._study.setdefault("timings", {})["total_s"] = total_s
        self._write()

    def _write(self) -> None:
        write_json(self.path, self._study)
        if self.after_write is not None:
            self.after_write()


def _check_same_space(old: dict, new: dict) -> None:
    for key in new:
        if json.dumps(old.get(key), sort_keys=True) != json.dumps(new[key], sort_keys=True):
            raise UserError(
                f"--resume: the space's '{key}' differs from the one the study started with; "
                "resume with the same search-space file"
            )
