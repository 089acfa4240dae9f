"""`prepare`: from a class-folder dataset to `results/<study>/data/` (manifest, audit, pixel cache).

Steps: scan (scan.py) -> decode, hash and resize every readable file once, in a worker pool
(decode.py, cache.py) -> duplicates and label conflicts (duplicates.py) -> groups -> split
(split.py) -> audit and leakage check (audit.py) -> per-split pixel caches. Everything is written
into `<out>.partial` and swapped in at the end, so an interrupted prepare never leaves a
half-written study folder; DATA is only read.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

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
from fer.data.split import (
    SPLITS,
    check_every_split_has_every_class,
    group_split,
    parse_fractions,
    parse_predefined,
    predefined_split,
)
from fer.prepare import audit as audit_mod
from fer.prepare.duplicates import (
    NEAR_MAX_LOCAL,
    NEAR_MIN_CORRELATION,
    NEAR_PHASH_BITS,
    UnionFind,
    find_duplicates,
)
from fer.prepare.hashing import SIG, batch_phashes
from fer.prepare.inspect import FileRecord, inspect_file
from fer.prepare.scan import scan_dataset

MANIFEST_COLUMNS = [
    "path",
    "label",
    "split",
    "group",
    "sha256",
    "pixel_hash",
    "phash",
    "width",
    "height",
    "format",
    "status",
    "reason",
]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Settings:
    """What `prepare_dataset` was asked for, checked once (the steps below read it)."""

    image_size: int
    workers: int | None
    max_pixels: int
    keep_duplicates: bool
    near: tuple[int, float, float]
    group_regex: str | None
    group_rx: re.Pattern | None
    fractions: tuple[float, float, float]
    seed: int
    predefined_spec: object  # parse_predefined's result, None for a seeded group split


def inspect_file_task(path: str, image_size: int, max_pixels: int):
    return inspect_file(Path(path), image_size, max_pixels)


def prepare_dataset(
    data_dir,
    out_dir,
    group_regex: str | None = None,
    split=(0.7, 0.15, 0.15),
    seed: int = 0,
    image_size: int = PARAMS["image_size"].default,
    predefined=None,
    classes: list[str] | None = None,
    keep_duplicates: bool = False,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
    near: tuple[int, float, float] = (NEAR_PHASH_BITS, NEAR_MIN_CORRELATION, NEAR_MAX_LOCAL),
    log=print,
) -> dict:
    """Prepare `data_dir` into `out_dir`; return the audit summary (also written to `audit.json`)."""
    t0 = time.perf_counter()
    fractions = parse_fractions(split)
    size = PARAMS["image_size"]
    if not size.low <= int(image_size) <= size.high:
        raise UserError(
            f"--image-size must be between {size.low} and {size.high}, got {image_size}"
        )
    image_size = int(image_size)
    try:
        group_rx = re.compile(group_regex) if group_regex else None
    except re.error as exc:
        raise UserError(f"--group-regex {group_regex!r} is not a valid regex: {exc}") from None
    if group_rx is not None and group_rx.groups < 1:
        raise UserError(f"--group-regex {group_regex!r} needs a capture group, e.g. '^(S\\d+)_'")
    predefined_spec = parse_predefined(predefined) if predefined else None

    scan = scan_dataset(data_dir, classes)
    out_dir = Path(out_dir).absolute()
    if out_dir.resolve() == scan.root or scan.root in out_dir.resolve().parents:
        raise UserError(
            f"the output folder {out_dir} is inside DATA ({scan.root}); DATA is read only"
        )
    with exclusive_lock(
        out_dir.with_name(f".{out_dir.name}.lock")
    ):  # two prepares of one study take turns
        settings = _Settings(
            image_size=image_size,
            workers=workers,
            max_pixels=max_pixels,
            keep_duplicates=keep_duplicates,
            near=near,
            group_regex=group_regex,
            group_rx=group_rx,
            fractions=fractions,
            seed=seed,
            predefined_spec=predefined_spec,
        )
        audit = _prepare_locked(out_dir, scan, settings, t0)
    if log:
        log(audit_mod.summary_text(audit, out_dir))
    return audit


def _prepare_locked(out_dir: Path, scan, settings: _Settings, t0: float) -> dict:
    """Prepare into `<out>.partial`, write study_data.json and the audit, then swap it in for
    `out_dir`."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "pixels").mkdir(parents=True)
    try:
        audit = _prepare_into(partial, scan, settings, t0)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    audit["source"] = str(scan.root)
    predefined_spec = settings.predefined_spec
    meta = {
        "format_version": FORMAT_VERSION,
        "source": str(scan.root),
        "classes": audit["classes"],
        "class_weights": audit["class_weights"],
        "image_sizes": [settings.image_size],
        "seed": settings.seed,
        "split": list(settings.fractions),
        "group_regex": settings.group_regex,
        "predefined": (
            str(predefined_spec) if isinstance(predefined_spec, Path) else predefined_spec
        ),
        "keep_duplicates": settings.keep_duplicates,
        "max_pixels": settings.max_pixels,
    }
    write_json(partial / STUDY_DATA_FILE, meta)
    seconds = time.perf_counter() - t0
    audit["timing"]["seconds"] = round(seconds, 2)
    audit["timing"]["images_per_s"] = (
        round(audit["timing"]["decoded"] / seconds, 1) if seconds else None
    )
    write_json(partial / AUDIT_FILE, audit)
    _swap_in(partial, out_dir)
    return audit


def _prepare_into(partial: Path, scan, settings: _Settings, t0: float) -> dict:
    """Everything between the scan and the swap: decode, duplicates, groups, split, audit, caches."""
    image_size, max_pixels, near, seed = (
        settings.image_size,
        settings.max_pixels,
        settings.near,
        settings.seed,
    )
    entries = scan.entries
    readable = [i for i, e in enumerate(entries) if not e.problem]
    records: list[FileRecord] = [
        FileRecord(status="quarantined", reason=e.problem) for e in entries
    ]
    raw = partial / "pixels" / f".all_{image_size}.raw"
    allocate(raw, len(readable) * row_bytes(image_size))
    workers = settings.workers if settings.workers is not None else default_workers(len(readable))
    root = str(scan.root)
    tasks = (  # plain strings: a pathlib join per file cost more than the rest of the loop
        ((os.path.join(root, entries[i].path), image_size, max_pixels), k * row_bytes(image_size))
        for k, i in enumerate(readable)
    )
    # the signatures (4 KiB per file, docs/duplicates.md) live in a file-backed map, like the pixel
    # rows: page cache the system can reclaim, not process memory that grows with the dataset
    sig_file = partial / ".signatures.u8"
    thumbs = np.memmap(sig_file, dtype=np.uint8, mode="w+", shape=(max(1, len(entries)), SIG, SIG))[
        : len(entries)
    ]
    rows = thumbs.view(np.ndarray)  # the same pages, without np.memmap's per-item bookkeeping
    for i, rec in zip(readable, decode_into(raw, inspect_file_task, tasks, workers)):
        if rec.thumb is not None:
            rows[i] = rec.thumb
            rec.thumb = None
        records[i] = rec
    hashed = [i for i, r in enumerate(records) if r.status in ("ok", "converted")]
    for i, h, hm in zip(
        hashed, *batch_phashes(thumbs[hashed] if len(hashed) < len(thumbs) else thumbs)
    ):
        records[i].phash, records[i].phash_mirror = h, hm
    decode_s = time.perf_counter() - t0

    table = _Table(entries, records)
    raw_row = {i: k for k, i in enumerate(readable)}
    class_names = sorted(scan.class_folders)
    dup_report = _mark_duplicates(table, thumbs, settings.keep_duplicates, near)
    audit_mod.write_contact_sheet(
        partial / DUPLICATES_SHEET, thumbs, table.path, table.label, dup_report, seed
    )
    del thumbs, rows
    sig_file.unlink()
    unmatched = _assign_groups(table, settings.group_rx, dup_report["clusters_idx"])
    usable_labels = {label for label, split in zip(table.label, table.split) if split == ""}
    empty = [c for c in class_names if c not in usable_labels]
    class_names = [c for c in class_names if c in usable_labels]
    if len(class_names) < 2:
        raise UserError(
            f"need at least two classes with usable images, found {len(class_names)}"
            f" ({', '.join(class_names) or 'none'}) in {scan.root}"
        )
    predefined_report = _assign_split(
        table,
        class_names,
        settings.fractions,
        seed,
        settings.predefined_spec,
        dup_report["clusters_idx"],
    )

    frame = table.frame()
    audit = audit_mod.build_audit(
        frame, class_names, scan.unknown_folders, empty, dup_report, predefined_report, near
    )
    audit["group_regex_unmatched"] = unmatched if settings.group_rx else None
    frame.to_csv(partial / MANIFEST_FILE, index=False)
    for s in SPLITS:
        rows = [raw_row[i] for i, split in enumerate(table.split) if split == s]
        write_npy_from_rows(partial / "pixels" / f"{s}_{image_size}.npy", raw, rows, image_size)
    raw.unlink()
    audit["timing"] = {
        "files": len(entries),
        "decoded": len(readable),
        "scan_decode_seconds": round(decode_s, 2),
        "workers": workers,
    }
    return audit


class _Table:
    """The manifest as plain column lists while rows are being decided (pandas per-cell access is
    ~100x slower, which matters at 30k files); `frame()` gives the DataFrame in MANIFEST_COLUMNS
    order."""

    def __init__(self, entries, records):
        self.path = [e.path for e in entries]
        self.label = [e.label for e in entries]
        self.split = ["excluded" if r.status == "quarantined" else "" for r in records]
        self.group = [""] * len(entries)
        self.sha256 = [r.sha256 for r in records]
        self.pixel_hash = [r.pixel_hash for r in records]
        self.phash = [r.phash for r in records]
        self.phash_mirror = [r.phash_mirror for r in records]
        self.width = [r.width for r in records]
        self.height = [r.height for r in records]
        self.format = [r.format for r in records]
        self.status = [r.status for r in records]
        self.reason = [r.reason for r in records]

    def note(self, i: int, status: str, reason: str) -> None:
        """Exclude row i with `status`, putting `reason` in front of any earlier one."""
        self.status[i] = status
        self.reason[i] = f"{reason}; {self.reason[i]}" if self.reason[i] else reason
        self.split[i] = "excluded"

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({c: getattr(self, c) for c in MANIFEST_COLUMNS})


def _mark_duplicates(table: _Table, thumbs: np.ndarray, keep_duplicates: bool, near) -> dict:
    """Cluster decoded images; exclude label conflicts; within a class keep one image per cluster."""
    decoded = [i for i, s in enumerate(table.status) if s in ("ok", "converted")]
    dups = find_duplicates(
        [table.pixel_hash[i] for i in decoded],
        [table.phash[i] for i in decoded],
        [table.phash_mirror[i] for i in decoded],
        thumbs if len(decoded) == len(thumbs) else thumbs[decoded],
        *near,
        labels=[table.label[i] for i in decoded],
    )
    clusters_idx = [[decoded[k] for k in c] for c in dups.clusters]
    conflicts = []
    for members in clusters_idx:
        labels = sorted({table.label[i] for i in members})
        if len(labels) > 1:
            conflicts.append({"labels": labels, "paths": [table.path[i] for i in members]})
            for i in members:
                table.note(
                    i,
                    "duplicate",
                    f"label conflict: the same image is labelled {' and '.join(labels)}",
                )
            continue
        if keep_duplicates:
            continue
        keeper = _keeper(table, members)
        for i in members:
            if i != keeper:
                kind = "exact" if table.pixel_hash[i] == table.pixel_hash[keeper] else "near"
                table.note(i, "duplicate", f"{kind} duplicate of {table.path[keeper]}")
    return {
        "clusters_idx": clusters_idx,
        "exact_pairs": [(decoded[i], decoded[j]) for i, j in dups.exact_pairs],
        "near_pairs": [(decoded[i], decoded[j]) for i, j in dups.near_pairs],
        "near_scores": dups.near_scores,
        "refused_unions": dups.refused,
        "label_conflicts": conflicts,
    }


def _keeper(table: _Table, members: list[int]) -> int:
    """The copy to keep: the largest, then one needing no conversion, then the first path."""
    return min(
        members,
        key=lambda i: (-table.width[i] * table.height[i], table.status[i] != "ok", table.path[i]),
    )


def _assign_groups(table: _Table, group_rx, clusters_idx: list[list[int]]) -> int:
    r"""group = subject id or the file itself, merged across duplicate clusters. The regex is
    searched in the file name, then in the path below the class folder (so `^(S\d+)/` finds subject
    sub-folders). Returns how many usable files the regex did not match."""
    keys, unmatched = [], 0
    for p, split in zip(table.path, table.split):
        m = None
        if group_rx:
            m = group_rx.search(p.rsplit("/", 1)[-1]) or group_rx.search(p.split("/", 1)[-1])
            unmatched += m is None and split == ""
        keys.append(m.group(1) if m else p)
    key_ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    uf = UnionFind(len(key_ids))
    for members in clusters_idx:
        for i in members[1:]:
            uf.union(key_ids[keys[members[0]]], key_ids[keys[i]])
    rep_name: dict[int, str] = {}
    for k in key_ids:  # a component is named by its first key in path order
        rep_name.setdefault(uf.find(key_ids[k]), k)
    table.group = [rep_name[uf.find(key_ids[k])] for k in keys]
    return unmatched


def _assign_split(
    table: _Table, class_names, fractions, seed, predefined_spec, clusters
) -> dict | None:
    label_idx = {c: n for n, c in enumerate(class_names)}
    if predefined_spec is None:
        usable = [i for i, s in enumerate(table.split) if s == ""]
        labels = np.array([label_idx[table.label[i]] for i in usable], dtype=np.int64)
        split_idx = group_split(
            labels, [table.group[i] for i in usable], len(class_names), fractions, seed
        )
        check_every_split_has_every_class(
            labels,
            split_idx,
            class_names,
            f"a {'/'.join(f'{f:g}' for f in fractions)} split keeping groups whole",
        )
        for i, s in zip(usable, split_idx):
            table.split[i] = SPLITS[s]
        return None
    # predefined: every copy, including those excluded above, counts with its declared split
    declared = predefined_split(table.path, predefined_spec)
    crossing = []
    for members in clusters:
        splits = sorted({declared[i] for i in members if declared[i]})
        if len(splits) > 1:
            crossing.append({"splits": splits, "paths": [table.path[i] for i in members]})
            for i in members:
                table.note(
                    i,
                    "duplicate",
                    f"duplicate cluster crosses the predefined splits {', '.join(splits)}",
                )
    unplaced = 0
    for i, split in enumerate(table.split):
        if split != "":
            continue
        if declared[i] is None:
            unplaced += 1
            table.split[i] = "excluded"
            table.reason[i] = "; ".join(
                x for x in ("not placed by the predefined split", table.reason[i]) if x
            )
        else:
            table.split[i] = declared[i]
    used = [i for i, s in enumerate(table.split) if s in SPLITS]
    labels = np.array([label_idx[table.label[i]] for i in used], dtype=np.int64)
    split_idx = np.array([SPLITS.index(table.split[i]) for i in used])
    check_every_split_has_every_class(labels, split_idx, class_names, "the predefined split")
    return {"crossing_clusters": crossing, "not_placed": unplaced}


def _swap_in(partial: Path, out_dir: Path) -> None:
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
