"""`StudyData`: a prepared study-data folder as every trial reads it.

Labels and paths come from `manifest.csv`, pixels from one memory-mapped `.npy` per split and image
size, so a trial that never asks for the test split never opens it. A size that was not prepared is
built on first use from DATA (decoded once more, checked against the manifest's pixel hash), under a
lock, so many trial processes asking at once build it once and all read the same finished file.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from fer.core.errors import UserError
from fer.core.names import AUDIT_FILE, MANIFEST_FILE, STUDY_DATA_FILE
from fer.core.progress import Progress
from fer.data.decode import Quarantine, decode_file, pixel_hash, resize_square
from fer.data.pixel_cache import (
    allocate,
    decode_into,
    default_workers,
    exclusive_lock,
    npy_header,
    open_pixels,
    row_bytes,
)
from fer.data.split import SPLITS


def _cache_task(path: str, expected_hash: str, size: int, max_pixels: int):
    try:
        dec = decode_file(Path(path), max_pixels)
    except Quarantine as q:
        return f"{path}: {q}", None
    if pixel_hash(dec.rgb) != expected_hash:
        return f"{path}: pixels differ from when it was prepared", None
    return None, resize_square(dec.rgb, size)


class StudyData:
    """Open `results/<study>/data` written by `prepare_dataset`."""

    def __init__(self, data_dir):
        self.dir = Path(data_dir)
        meta_path = self.dir / STUDY_DATA_FILE
        if not meta_path.is_file() or not (self.dir / MANIFEST_FILE).is_file():
            raise UserError(
                f"{self.dir} is not a prepared study-data folder (run `fer-study prepare` first)"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{meta_path} is not valid JSON: {exc}") from None
        self.classes: list[str] = list(self.meta["classes"])
        weights = json.loads((self.dir / AUDIT_FILE).read_text())["class_weights"]
        self.class_weights: dict[int, float] = {
            i: float(weights[c]) for i, c in enumerate(self.classes)
        }
        self.source = Path(self.meta["source"])

    @cached_property
    def _manifest(self) -> pd.DataFrame:
        return pd.read_csv(
            self.dir / MANIFEST_FILE,
            dtype={"path": str, "label": str, "split": str},
            keep_default_na=False,
        )

    def _rows(self, split: str) -> pd.DataFrame:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        m = self._manifest
        return m[m.split == split]

    def labels(self, split: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[c] for c in self._rows(split).label], dtype=np.int64)

    def paths(self, split: str) -> list[str]:
        return self._rows(split).path.tolist()

    def pixel_file(self, split: str, image_size: int) -> Path:
        return self.dir / "pixels" / f"{split}_{int(image_size)}.npy"

    def pixels(self, split: str, image_size: int) -> np.ndarray:
        """uint8 (N, S, S, 3), memory-mapped, in manifest order; built from DATA if this size is
        new."""
        path = self.pixel_file(split, image_size)
        if not path.exists():
            self._build(split, int(image_size), path)
        return open_pixels(path)

    def _build(self, split: str, size: int, dest: Path, workers: int | None = None) -> None:
        with exclusive_lock(dest.with_name(f".{dest.stem}.lock")):
            if dest.exists():  # another process built it while we waited
                return
            rows = self._rows(split)
            if not self.source.is_dir():
                raise UserError(
                    f"the {size}px pixel cache for '{split}' does not exist and DATA "
                    f"({self.source}) is not available to build it"
                )
            partial = dest.with_name(dest.name + ".partial")
            header = npy_header(len(rows), size)
            allocate(partial, len(header) + len(rows) * row_bytes(size))
            with open(partial, "r+b") as f:
                f.write(header)
            max_pixels = int(self.meta.get("max_pixels", 100_000_000))
            tasks = (
                ((str(self.source / p), h, size, max_pixels), len(header) + k * row_bytes(size))
                for k, (p, h) in enumerate(zip(rows.path, rows.pixel_hash))
            )
            workers = default_workers(len(rows)) if workers is None else workers
            progress = Progress(f"{size}px pixel cache ({split})", len(rows), unit="files")
            problems = []
            for msg in decode_into(partial, _cache_task, tasks, workers):
                progress.advance()
                if msg:
                    problems.append(msg)
            if problems:
                partial.unlink(missing_ok=True)
                raise UserError(
                    f"cannot build the {size}px cache: {len(problems)} file(s) in DATA changed "
                    f"since prepare (first: {problems[0]}); run `fer-study prepare` again"
                )
            partial.replace(dest)
