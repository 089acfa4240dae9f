"""`prepare`: from a class-folder dataset to `results/<study>/data/` (manifest, audit, pixel cache).

Steps: scan (scan.py) -> decode, hash and resize every readable file once, in a worker pool
(fer.data.decode, fer.data.pixel_cache) -> duplicates and label conflicts, groups, split
(placement.py) -> audit and leakage check (audit.py) -> per-split pixel caches. Everything is
written into `<out>.partial` and swapped in at the end, so an interrupted prepare never leaves a
half-written study folder; DATA is only read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fer.core.config import PARAMS
from fer.core.errors import UserError
from fer.core.files import write_json
from fer.core.names import AUDIT_FILE, DUPLICATES_SHEET, MANIFEST_FILE, STUDY_DATA_FILE
from fer.data.decode import MAX_PIXELS
from fer.data.pixel_cache import (
    allocate,
    decode_into,
    default_workers,
    exclusive_lock,
    row_bytes,
    write_npy_from_rows,
)
from fer.data.split import SPLITS, parse_fractions, parse_predefined
from fer.prepare import audit as audit_mod
from fer.prepare.duplicates import NEAR_MAX_LOCAL, NEAR_MIN_CORRELATION, NEAR_PHASH_BITS
from fer.prepare.hashing import SIG, batch_phashes
from fer.prepare.inspect import FileRecord, inspect_file
from fer.prepare.placement import (
    MANIFEST_COLUMNS,
    ManifestTable,
    assign_groups,
    assign_split,
    mark_duplicates,
)
from fer.prepare.scan import ScanResult, scan_dataset

__all__ = ["MANIFEST_COLUMNS", "PrepareSettings", "prepare_dataset"]

FORMAT_VERSION = 1
SIGNATURES_FILE = ".signatures.u8"  # scratch, inside `<out>.partial` while duplicates are found


@dataclass(frozen=True)
class PrepareSettings:
    """What to prepare: one field per `fer-study prepare` option (same names and defaults)."""

    group_regex: str | None = None  # subject id in the file name: one capture group
    split: str | tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, val, test fractions
    seed: int = 0
    image_size: int = PARAMS["image_size"].default
    predefined: str | dict | None = None  # the dataset's own split: split=REGEX pairs or a CSV
    classes: list[str] | None = None  # the expected class folders (None: every folder)
    keep_duplicates: bool = False
    workers: int | None = None  # decoding processes (None: fer.data.pixel_cache decides)
    max_pixels: int = MAX_PIXELS
    # the near-duplicate rule: pHash bits, minimum correlation, maximum local difference
    near: tuple[int, float, float] = (NEAR_PHASH_BITS, NEAR_MIN_CORRELATION, NEAR_MAX_LOCAL)

    @classmethod
    def from_options(cls, options: dict) -> PrepareSettings:
        """The settings from keyword options; a misspelt option is an error, never ignored."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise TypeError(
                f"prepare_dataset() got unknown setting(s) {', '.join(map(repr, unknown))}; "
                f"the settings are: {', '.join(known)}"
            )
        return cls(**options)


@dataclass(frozen=True)
class _Checked:
    """The settings after checking, parsed once (the steps below read this)."""

    asked: PrepareSettings
    image_size: int
    fractions: tuple[float, float, float]
    group_rx: re.Pattern | None
    predefined_spec: object  # parse_predefined's result, None for a seeded group split


def prepare_dataset(
    data_dir, out_dir, *, settings: PrepareSettings | None = None, log=print, **options
) -> dict:
    """Prepare `data_dir` into `out_dir`; return the audit summary (also written to `audit.json`).

    The settings come as a `PrepareSettings` or as its fields by keyword
    (`prepare_dataset(data, out, group_regex=..., seed=1)`); `log` gets the summary (None: quiet).
    """
    if settings is not None and options:
        raise TypeError("prepare_dataset() takes settings= or keyword settings, not both")
    if settings is None:
        settings = PrepareSettings.from_options(options)
    t0 = time.perf_counter()
    checked = _check(settings)
    scan = scan_dataset(data_dir, settings.classes)
    out_dir = _output_folder(out_dir, scan)
    with exclusive_lock(out_dir.with_name(f".{out_dir.name}.lock")):  # two prepares take turns
        audit = _prepare_locked(out_dir, scan, checked, t0)
    if log:
        log(audit_mod.summary_text(audit, out_dir))
    return audit


def _check(settings: PrepareSettings) -> _Checked:
    """UserError for a setting that cannot work, before any file is read."""
    fractions = parse_fractions(settings.split)
    size = PARAMS["image_size"]
    if not size.low <= int(settings.image_size) <= size.high:
        raise UserError(
            f"--image-size must be between {size.low} and {size.high}, got {settings.image_size}"
        )
    return _Checked(
        asked=settings,
        image_size=int(settings.image_size),
        fractions=fractions,
        group_rx=_group_pattern(settings.group_regex),
        predefined_spec=parse_predefined(settings.predefined) if settings.predefined else None,
    )


def _group_pattern(group_regex: str | None) -> re.Pattern | None:
    try:
        group_rx = re.compile(group_regex) if group_regex else None
    except re.error as exc:
        raise UserError(f"--group-regex {group_regex!r} is not a valid regex: {exc}") from None
    if group_rx is not None and group_rx.groups < 1:
        raise UserError(f"--group-regex {group_regex!r} needs a capture group, e.g. '^(S\\d+)_'")
    return group_rx


def _output_folder(out_dir, scan: ScanResult) -> Path:
    out_dir = Path(out_dir).absolute()
    if out_dir.resolve() == scan.root or scan.root in out_dir.resolve().parents:
        raise UserError(
            f"the output folder {out_dir} is inside DATA ({scan.root}); DATA is read only"
        )
    return out_dir


def _prepare_locked(out_dir: Path, scan: ScanResult, checked: _Checked, t0: float) -> dict:
    """Prepare into `<out>.partial`, write study_data.json and the audit, then swap it in for
    `out_dir`."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "pixels").mkdir(parents=True)
    try:
        audit = _prepare_into(partial, scan, checked, t0)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    audit["source"] = str(scan.root)
    write_json(partial / STUDY_DATA_FILE, _study_data_meta(audit, scan, checked))
    seconds = time.perf_counter() - t0
    audit["timing"]["seconds"] = round(seconds, 2)
    audit["timing"]["images_per_s"] = (
        round(audit["timing"]["decoded"] / seconds, 1) if seconds else None
    )
    write_json(partial / AUDIT_FILE, audit)
    _swap_in(partial, out_dir)
    return audit


def _study_data_meta(audit: dict, scan: ScanResult, checked: _Checked) -> dict:
    """study_data.json: what StudyData reads, and the settings that made the folder."""
    asked, predefined_spec = checked.asked, checked.predefined_spec
    return {
        "format_version": FORMAT_VERSION,
        "source": str(scan.root),
        "classes": audit["classes"],
        "class_weights": audit["class_weights"],
        "image_sizes": [checked.image_size],
        "seed": asked.seed,
        "split": list(checked.fractions),
        "group_regex": asked.group_regex,
        "predefined": (
            str(predefined_spec) if isinstance(predefined_spec, Path) else predefined_spec
        ),
        "keep_duplicates": asked.keep_duplicates,
        "max_pixels": asked.max_pixels,
    }


def _prepare_into(partial: Path, scan: ScanResult, checked: _Checked, t0: float) -> dict:
    """Everything between the scan and the swap: decode, duplicates, groups, split, audit,
    caches."""
    asked = checked.asked
    decoded, signatures = _decode_and_hash(partial, scan, checked)
    decode_s = time.perf_counter() - t0

    table = ManifestTable(scan.entries, decoded.records)
    dups = mark_duplicates(table, signatures, asked.keep_duplicates, asked.near)
    audit_mod.write_contact_sheet(
        partial / DUPLICATES_SHEET, signatures, table.path, table.label, dups, asked.seed
    )
    del signatures  # done with: its pages go before the pixel caches are written
    (partial / SIGNATURES_FILE).unlink()
    unmatched = assign_groups(table, checked.group_rx, dups.clusters)
    class_names, empty = _usable_classes(table, scan)
    predefined_report = assign_split(
        table,
        class_names,
        checked.fractions,
        asked.seed,
        checked.predefined_spec,
        dups.clusters,
    )

    frame = table.frame()
    audit = audit_mod.build_audit(
        frame, class_names, scan.unknown_folders, empty, dups, predefined_report
    )
    audit["group_regex_unmatched"] = unmatched if checked.group_rx else None
    frame.to_csv(partial / MANIFEST_FILE, index=False)
    _write_pixel_caches(partial, decoded, table.split, checked.image_size)
    audit["timing"] = {
        "files": len(scan.entries),
        "decoded": len(decoded.readable),
        "scan_decode_seconds": round(decode_s, 2),
        "workers": decoded.workers,
    }
    return audit


# ------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class _Decoded:
    """What decoding left behind, besides the signatures."""

    records: list[FileRecord]  # one per scanned file (quarantined where it was not read)
    readable: list[int]  # the scanned files that were decoded; row k of `raw` is readable[k]'s
    raw: Path  # their resized pixel rows, one after another
    workers: int


def inspect_file_task(path: str, image_size: int, max_pixels: int):
    return inspect_file(Path(path), image_size, max_pixels)


def _decode_and_hash(
    partial: Path, scan: ScanResult, checked: _Checked
) -> tuple[_Decoded, np.ndarray]:
    """Decode every readable file once, in a worker pool: its resized pixel row goes into a raw row
    file, its 64x64 signature into a file-backed map (returned with the records); then the pHashes
    of everything decoded, in one vectorised pass."""
    entries, image_size = scan.entries, checked.image_size
    readable = [i for i, e in enumerate(entries) if not e.problem]
    records: list[FileRecord] = [
        FileRecord(status="quarantined", reason=e.problem) for e in entries
    ]
    raw = partial / "pixels" / f".all_{image_size}.raw"
    allocate(raw, len(readable) * row_bytes(image_size))
    workers = (
        checked.asked.workers
        if checked.asked.workers is not None
        else default_workers(len(readable))
    )
    root = str(scan.root)
    tasks = (  # plain strings: a pathlib join per file cost more than the rest of the loop
        (
            (os.path.join(root, entries[i].path), image_size, checked.asked.max_pixels),
            k * row_bytes(image_size),
        )
        for k, i in enumerate(readable)
    )
    thumbs = _signature_map(partial / SIGNATURES_FILE, len(entries))
    rows = thumbs.view(np.ndarray)  # the same pages, without np.memmap's per-item bookkeeping
    for i, rec in zip(readable, decode_into(raw, inspect_file_task, tasks, workers)):
        if rec.thumb is not None:
            rows[i] = rec.thumb
            rec.thumb = None
        records[i] = rec
    _add_phashes(records, thumbs)
    return _Decoded(records, readable, raw, workers), thumbs


def _signature_map(path: Path, n: int) -> np.ndarray:
    """(n, 64, 64) uint8 signatures in a file-backed map, like the pixel rows (4 KiB per file,
    docs/duplicates.md): page cache the system can reclaim, not process memory that grows with the
    dataset."""
    return np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(1, n), SIG, SIG))[:n]


def _add_phashes(records: list[FileRecord], thumbs: np.ndarray) -> None:
    hashed = [i for i, r in enumerate(records) if r.status in ("ok", "converted")]
    for i, h, hm in zip(
        hashed, *batch_phashes(thumbs[hashed] if len(hashed) < len(thumbs) else thumbs)
    ):
        records[i].phash, records[i].phash_mirror = h, hm


# ------------------------------------------------------------------------------------ writing
def _usable_classes(table: ManifestTable, scan: ScanResult) -> tuple[list[str], list[str]]:
    """(classes with usable images, class folders without any); UserError below two classes."""
    class_names = sorted(scan.class_folders)
    usable_labels = {table.label[i] for i in table.usable()}
    empty = [c for c in class_names if c not in usable_labels]
    class_names = [c for c in class_names if c in usable_labels]
    if len(class_names) < 2:
        raise UserError(
            f"need at least two classes with usable images, found {len(class_names)}"
            f" ({', '.join(class_names) or 'none'}) in {scan.root}"
        )
    return class_names, empty


def _write_pixel_caches(partial: Path, decoded: _Decoded, splits: list[str], size: int) -> None:
    """One .npy per split, gathered from the raw rows (which are then deleted)."""
    raw_row = {i: k for k, i in enumerate(decoded.readable)}
    for s in SPLITS:
        rows = [raw_row[i] for i, split in enumerate(splits) if split == s]
        write_npy_from_rows(partial / "pixels" / f"{s}_{size}.npy", decoded.raw, rows, size)
    decoded.raw.unlink()


def _swap_in(partial: Path, out_dir: Path) -> None:
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
