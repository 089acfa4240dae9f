"""The driver's local mirror of a study that lives in storage (`fer-study run --storage`), and the
copy of a stored study that `report`, `predict`, `evaluate` and `export` work from.

Storage is the study's truth; the driver writes its files (study.json, trials.csv, outcome.json,
Optuna's SQLite, study.log) in its mirror, as for a local study, and `StudyMirror.push` uploads each
the moment it is written, outcome.json first: a driver lost at any moment leaves a study in storage
that `--resume` on another machine continues from (study.tune.search.discard_interrupted settles an
Optuna trial whose outcome got there before the SQLite copy did). Trial folders come the other way:
a trial uploads its own folder before it ends, and the driver copies it into the mirror (without
its model file: only best/<backbone>/ keeps models) before writing the trial's outcome.

`pull_study` copies a stored study into a local folder: everything but Tune's own folder, the lease,
per-trial model files and published folders that are not complete (no `_COMMITTED` marker yet).
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from fer.core import names
from study.storage.home import StudyHome
from study.storage.location import StudyStorage
from study.storage.transfer import MARKER, download_file, list_files, upload_file

SKIPPED_TOP = ("tune/",)  # Ray Tune's own experiment folders: only Tune reads them
LEASE_FILE = "driver_lease.json"
TRIAL_MODEL_SUFFIXES = (".keras",)


def _is_trial_model(rel: str) -> bool:
    parts = rel.split("/")
    return parts[0] == names.TRIALS_DIR and rel.endswith(TRIAL_MODEL_SUFFIXES)


def _incomplete_folders(files: dict[str, int]) -> set[str]:
    """Folders published with a marker (data/, best/<backbone>/, naive-split data) that have files
    but no marker yet: an upload under way or cut short."""
    folders = {"data"} | {
        "/".join(rel.split("/")[:2]) for rel in files if rel.startswith(names.BEST_DIR + "/")
    }
    return {f for f in folders if any(r.startswith(f + "/") for r in files)} - {
        rel.rsplit("/", 1)[0] for rel in files if rel.endswith("/" + MARKER)
    }


def pull_study(storage: StudyStorage, dest: Path, trial_models: bool = False) -> int:
    """Copy the study rooted at `storage` into `dest` (files whose size already matches are kept);
    return how many files were downloaded."""
    files = list_files(storage)
    incomplete = _incomplete_folders(files)
    fetched = 0
    for rel, size in files.items():
        if (
            rel.startswith(SKIPPED_TOP)
            or rel == LEASE_FILE
            or rel.rsplit("/", 1)[-1] in (MARKER,)
            or rel.rsplit("/", 1)[-1].startswith("_probe-")
            or (not trial_models and _is_trial_model(rel))
            or any(rel.startswith(folder + "/") for folder in incomplete)
        ):
            continue
        local = Path(dest) / rel
        if local.is_file() and local.stat().st_size == size and rel != names.OPTUNA_FILE:
            continue
        download_file(storage, rel, local)
        fetched += 1
    return fetched


class StudyMirror:
    """The driver's side of a stored study: what it uploads as it writes, and the trial folders it
    copies in. Every method does nothing for a study without storage."""

    def __init__(self, home: StudyHome):
        self.home = home
        self.study_dir = Path(home.study_dir)

    def push(self, *rels: str) -> None:
        """Upload the study files `rels` (those that exist) from the mirror, in the order given;
        Optuna's SQLite through SQLite's backup API, so a write under way is never half-copied."""
        if not self.home.remote:
            return
        storage = self.home.storage()
        for rel in rels:
            local = self.study_dir / rel
            if not local.is_file():
                continue
            if rel == names.OPTUNA_FILE:
                with tempfile.TemporaryDirectory(prefix="fer-optuna-") as tmp:
                    copy = Path(tmp) / names.OPTUNA_FILE
                    _sqlite_copy(local, copy)
                    upload_file(storage, copy, rel)
            else:
                upload_file(storage, local, rel)

    def push_outcome(self, trial_id: str) -> None:
        """A trial's outcome was written: its outcome.json, then everything it changed."""
        self.push(
            f"{names.TRIALS_DIR}/{trial_id}/{names.OUTCOME_FILE}",
            names.TRIALS_CSV,
            names.OPTUNA_FILE,
            names.STUDY_FILE,
            names.STUDY_LOG,
        )

    def pull_trial(self, trial_id: str) -> None:
        """Copy the trial's folder from storage into the mirror (no model file), and append what it
        logged (progress lines, an error's traceback) to the study log."""
        if not self.home.remote:
            return
        rel = f"{names.TRIALS_DIR}/{trial_id}"
        storage = self.home.storage()
        files = [n for n in list_files(storage, rel) if not n.endswith(TRIAL_MODEL_SUFFIXES)]
        for name in files:
            download_file(storage, f"{rel}/{name}", self.study_dir / rel / name)
        lines = []
        for name in (names.TRIAL_LOG_FILE, names.ERROR_FILE):
            path = self.study_dir / rel / name
            if path.is_file() and path.stat().st_size:
                text = path.read_text(errors="replace").rstrip("\n")
                lines += [f"[{trial_id}] {line}" for line in text.splitlines()]
        if lines:
            with open(self.study_dir / names.STUDY_LOG, "a") as log:
                log.write("\n".join(lines) + "\n")

    def pull(self, rel: str) -> Path:
        """Copy the folder `rel` (a retraining's) from storage into the mirror; return it."""
        local = self.study_dir / rel
        if self.home.remote:
            storage = self.home.storage()
            for name in list_files(storage, rel):
                download_file(storage, f"{rel}/{name}", local / name)
        return local

    def pull_published(self, rel: str) -> None:
        """Copy a published folder (best/<backbone>/) into the mirror, replacing what was there."""
        if self.home.remote:
            import shutil

            shutil.rmtree(self.study_dir / rel, ignore_errors=True)
            self.home.fetch_published(rel, self.study_dir / rel)


def _sqlite_copy(src: Path, dst: Path) -> None:
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=60)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
