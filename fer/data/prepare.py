"""`prepare`: from a class-folder dataset to `results/<study>/data/` (manifest, audit, pixel cache).

Steps: scan (scan.py) -> decode, hash and resize every readable file once, in a worker pool (decode.py,
cache.py) -> duplicates and label conflicts (duplicates.py) -> groups -> split (split.py) -> audit and
leakage check (audit.py) -> per-split pixel caches. Everything is written into `<out>.partial` and swapped
in at the end, so an interrupted prepare never leaves a half-written study folder; DATA is only read.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fer.data import audit as audit_mod
from fer.data.cache import allocate, decode_into, default_workers, row_bytes, write_npy_from_rows
from fer.data.decode import MAX_PIXELS, FileRecord, inspect_file
from fer.data.duplicates import NEAR_MIN_CORRELATION, NEAR_PHASH_BITS, UnionFind, find_duplicates
from fer.data.scan import scan_dataset
from fer.data.split import (SPLITS, check_every_split_has_every_class, group_split, parse_fractions,
                            parse_predefined, predefined_split)
from fer.errors import UserError

MANIFEST_COLUMNS = ["path", "label", "split", "group", "sha256", "pixel_hash", "phash", "width", "height",
                    "format", "status", "reason"]
FORMAT_VERSION = 1


def _inspect_task(path: str, image_size: int, max_pixels: int):
    rec, small = inspect_file(Path(path), image_size, max_pixels)
    return rec, small


def prepare_dataset(data_dir, out_dir, group_regex: str | None = None, split=(0.7, 0.15, 0.15), seed: int = 0,
                    image_size: int = 224, predefined=None, classes: list[str] | None = None,
                    keep_duplicates: bool = False, workers: int | None = None,
                    max_pixels: int = MAX_PIXELS, near: tuple[int, float] = (NEAR_PHASH_BITS, NEAR_MIN_CORRELATION),
                    log=print) -> dict:
    """Prepare `data_dir` into `out_dir`; return the audit summary (also written to `audit.json`)."""
    t0 = time.perf_counter()
    fractions = parse_fractions(split)
    if not 8 <= int(image_size) <= 1024:
        raise UserError(f"--image-size must be between 8 and 1024, got {image_size}")
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
        raise UserError(f"the output folder {out_dir} is inside DATA ({scan.root}); DATA is read only")
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "pixels").mkdir(parents=True)

    entries = scan.entries
    readable = [i for i, e in enumerate(entries) if not e.problem]
    records: list[FileRecord] = [FileRecord(status="quarantined", reason=e.problem) for e in entries]
    raw = partial / "pixels" / f".all_{image_size}.raw"
    allocate(raw, len(readable) * row_bytes(image_size))
    if workers is None:
        workers = default_workers(len(readable))
    tasks = ((_inspect_task, (str(scan.root / entries[i].path), image_size, max_pixels), k * row_bytes(image_size))
             for k, i in enumerate(readable))
    thumbs = np.zeros((len(entries), 32, 32), dtype=np.uint8)
    for i, rec in zip(readable, decode_into(raw, tasks, workers)):
        if rec.thumb is not None:
            thumbs[i] = rec.thumb
            rec.thumb = None
        records[i] = rec
    decode_s = time.perf_counter() - t0

    table = _table(entries, records)
    raw_row = {i: k for k, i in enumerate(readable)}
    class_names = sorted(scan.class_folders)
    dup_report = _mark_duplicates(table, thumbs, keep_duplicates, near)
    _assign_groups(table, group_rx, dup_report["clusters_idx"])
    usable_labels = set(table.label[table.split == ""])
    empty = [c for c in class_names if c not in usable_labels]
    class_names = [c for c in class_names if c in usable_labels]
    if len(class_names) < 2:
        raise UserError(f"need at least two classes with usable images, found {len(class_names)}"
                        f" ({', '.join(class_names) or 'none'}) in {data_dir}")
    predefined_report = _assign_split(table, class_names, fractions, seed, predefined_spec,
                                      dup_report["clusters_idx"])

    audit = audit_mod.build_audit(table, class_names, scan.unknown_folders, empty, dup_report,
                                  predefined_report, near)
    meta = {
        "format_version": FORMAT_VERSION, "source": str(scan.root), "classes": class_names,
        "class_weights": audit["class_weights"], "image_sizes": [image_size], "seed": seed,
        "split": list(fractions), "group_regex": group_regex,
        "predefined": (str(predefined_spec) if isinstance(predefined_spec, Path) else predefined_spec),
        "keep_duplicates": keep_duplicates, "max_pixels": max_pixels,
    }
    table[MANIFEST_COLUMNS].to_csv(partial / "manifest.csv", index=False)
    (partial / "audit.json").write_text(json.dumps(audit, indent=2))
    (partial / "study_data.json").write_text(json.dumps(meta, indent=2))
    for s in SPLITS:
        rows = [raw_row[i] for i in table.index[table.split == s]]
        write_npy_from_rows(partial / "pixels" / f"{s}_{image_size}.npy", raw, rows, image_size)
    raw.unlink()

    _swap_in(partial, out_dir)
    seconds = time.perf_counter() - t0
    audit["timing"] = {"files": len(entries), "decoded": len(readable), "seconds": round(seconds, 2),
                       "decode_seconds": round(decode_s, 2),
                       "images_per_s": round(len(readable) / seconds, 1) if seconds else None,
                       "workers": workers}
    (out_dir / "audit.json").write_text(json.dumps(audit, indent=2))
    if log:
        log(audit_mod.summary_text(audit, out_dir))
    return audit


def _table(entries, records) -> pd.DataFrame:
    rows = []
    for e, r in zip(entries, records):
        rows.append({"path": e.path, "label": e.label, "split": "excluded" if r.status == "quarantined" else "",
                     "group": "", "sha256": r.sha256, "pixel_hash": r.pixel_hash, "phash": r.phash,
                     "width": r.width, "height": r.height, "format": r.format,
                     "status": r.status, "reason": r.reason})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def _note(table: pd.DataFrame, i: int, status: str, reason: str) -> None:
    old = table.at[i, "reason"]
    table.at[i, "status"] = status
    table.at[i, "reason"] = f"{reason}; {old}" if old else reason
    table.at[i, "split"] = "excluded"


def _mark_duplicates(table: pd.DataFrame, thumbs: np.ndarray, keep_duplicates: bool, near) -> dict:
    """Cluster decoded images; exclude label conflicts; within a class keep one image per cluster."""
    decoded = table.index[table.status.isin(["ok", "converted"])].to_numpy()
    dups = find_duplicates(table.loc[decoded, "pixel_hash"].tolist(), table.loc[decoded, "phash"].tolist(),
                           thumbs[decoded], *near)
    exact_set = {tuple(sorted(p)) for p in dups.exact_pairs}
    clusters_idx = [[int(decoded[k]) for k in c] for c in dups.clusters]
    conflicts = []
    for members in clusters_idx:
        labels = sorted(set(table.loc[members, "label"]))
        if len(labels) > 1:
            conflicts.append({"labels": labels, "paths": table.loc[members, "path"].tolist()})
            for i in members:
                _note(table, i, "duplicate", f"label conflict: the same image is labelled {' and '.join(labels)}")
            continue
        if keep_duplicates:
            continue
        keeper = _keeper(table, members)
        for i in members:
            if i != keeper:
                kind = "exact" if table.at[i, "pixel_hash"] == table.at[keeper, "pixel_hash"] else "near"
                _note(table, i, "duplicate", f"{kind} duplicate of {table.at[keeper, 'path']}")
    return {
        "clusters_idx": clusters_idx,
        "exact_pairs": [(int(decoded[i]), int(decoded[j])) for i, j in dups.exact_pairs],
        "near_pairs": [(int(decoded[i]), int(decoded[j])) for i, j in dups.near_pairs],
        "label_conflicts": conflicts,
        "n_exact_pairs": len(exact_set),
    }


def _keeper(table: pd.DataFrame, members: list[int]) -> int:
    """The copy to keep: the largest, then one needing no conversion, then the first path."""
    return min(members, key=lambda i: (-int(table.at[i, "width"]) * int(table.at[i, "height"]),
                                       table.at[i, "status"] != "ok", table.at[i, "path"]))


def _assign_groups(table: pd.DataFrame, group_rx, clusters_idx: list[list[int]]) -> None:
    """group = subject id (regex on the file name) or the file itself, merged across duplicate clusters."""
    keys = []
    for p in table.path:
        m = group_rx.search(p.rsplit("/", 1)[-1]) if group_rx else None
        keys.append(m.group(1) if m else p)
    key_ids = {k: n for n, k in enumerate(dict.fromkeys(keys))}
    uf = UnionFind(len(key_ids))
    for members in clusters_idx:
        for i in members[1:]:
            uf.union(key_ids[keys[members[0]]], key_ids[keys[i]])
    names = list(key_ids)
    rep_name: dict[int, str] = {}
    for k in names:  # a component is named by its first key in path order
        rep_name.setdefault(uf.find(key_ids[k]), k)
    table["group"] = [rep_name[uf.find(key_ids[k])] for k in keys]


def _assign_split(table, class_names, fractions, seed, predefined_spec, clusters) -> dict | None:
    usable = table.index[table.split == ""].to_numpy()
    label_idx = {c: n for n, c in enumerate(class_names)}
    if predefined_spec is None:
        labels = np.array([label_idx[c] for c in table.loc[usable, "label"]], dtype=np.int64)
        split_idx = group_split(labels, table.loc[usable, "group"].tolist(), len(class_names), fractions, seed)
        check_every_split_has_every_class(labels, split_idx, class_names,
                                          f"a {'/'.join(f'{f:g}' for f in fractions)} split keeping groups whole")
        table.loc[usable, "split"] = [SPLITS[s] for s in split_idx]
        return None
    # predefined: every copy, including those excluded above, counts with its declared split
    declared = pd.Series(predefined_split(table.path.tolist(), predefined_spec), index=table.index)
    crossing = []
    for members in clusters:
        splits = sorted({s for s in declared[members] if s})
        if len(splits) > 1:
            crossing.append({"splits": splits, "paths": table.loc[members, "path"].tolist()})
            for i in members:
                _note(table, i, "duplicate", f"duplicate cluster crosses the predefined splits {', '.join(splits)}")
    unplaced = 0
    for i in usable:
        if table.at[i, "split"] != "":
            continue
        if declared[i] is None:
            unplaced += 1
            table.at[i, "split"] = "excluded"
            table.at[i, "reason"] = "; ".join(x for x in ("not placed by the predefined split",
                                                          table.at[i, "reason"]) if x)
        else:
            table.at[i, "split"] = declared[i]
    used = table.index[table.split.isin(SPLITS)]
    labels = np.array([label_idx[c] for c in table.loc[used, "label"]], dtype=np.int64)
    split_idx = np.array([SPLITS.index(s) for s in table.loc[used, "split"]])
    check_every_split_has_every_class(labels, split_idx, class_names, "the predefined split")
    return {"crossing_clusters": crossing, "not_placed": unplaced}


def _swap_in(partial: Path, out_dir: Path) -> None:
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    partial.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
