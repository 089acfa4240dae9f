"""Where each scanned file goes: the manifest as columns while its rows are decided.

After decoding, `prepare` decides per file, in this order: duplicates and label conflicts are
excluded (`mark_duplicates`), every file gets a group (`assign_groups`: its subject, merged across
duplicate clusters), and the usable files get a split (`assign_split`: seeded and group-aware, or
the dataset's own predefined split). Each exclusion keeps its reason in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fer.data.split import (
    SPLITS,
    check_every_split_has_every_class,
    group_split,
    predefined_split,
)
from fer.prepare.duplicates import NearRule, UnionFind, find_duplicates

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


class ManifestTable:
    """The manifest as plain column lists while rows are being decided (pandas per-cell access is
    far slower, and a dataset can hold tens of thousands of files); `frame()` gives the DataFrame in
    MANIFEST_COLUMNS order."""

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

    def usable(self) -> list[int]:
        """The rows not excluded (yet): those still waiting for a split."""
        return [i for i, s in enumerate(self.split) if s == ""]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({c: getattr(self, c) for c in MANIFEST_COLUMNS})


# ------------------------------------------------------------------------------------ duplicates
@dataclass(frozen=True)
class DuplicateReport:
    """What `mark_duplicates` found, for the audit and the contact sheet (indices: table rows)."""

    clusters: list[list[int]]  # every cluster of 2+ copies, exact or near
    exact_pairs: list[tuple[int, int]]
    near_pairs: list[tuple[int, int]]  # the confirmed near pairs that joined clusters
    near_scores: list[dict]  # per near pair: its alignment and scores (alignment.compare)
    refused_unions: int  # confirmed pairs left apart by the cluster check
    label_conflicts: list[dict]  # clusters whose copies carry different labels
    near_rule: tuple[int, float, float]  # pHash bits, minimum correlation, maximum local difference


def mark_duplicates(
    table: ManifestTable, thumbs: np.ndarray, keep_duplicates: bool, near
) -> DuplicateReport:
    """Cluster decoded images; exclude label conflicts; within a class keep one image per
    cluster."""
    decoded = [i for i, s in enumerate(table.status) if s in ("ok", "converted")]
    dups = find_duplicates(
        [table.pixel_hash[i] for i in decoded],
        [table.phash[i] for i in decoded],
        [table.phash_mirror[i] for i in decoded],
        thumbs if len(decoded) == len(thumbs) else thumbs[decoded],
        NearRule(*near),
        labels=[table.label[i] for i in decoded],
    )
    clusters_idx = [[decoded[k] for k in c] for c in dups.clusters]
    conflicts = []
    for members in clusters_idx:
        labels = sorted({table.label[i] for i in members})
        if len(labels) > 1:
            conflicts.append({"labels": labels, "paths": [table.path[i] for i in members]})
            _exclude_conflict(table, members, labels)
        elif not keep_duplicates:
            _keep_one_copy(table, members)
    return DuplicateReport(
        clusters=clusters_idx,
        exact_pairs=[(decoded[i], decoded[j]) for i, j in dups.exact_pairs],
        near_pairs=[(decoded[i], decoded[j]) for i, j in dups.near_pairs],
        near_scores=dups.near_scores,
        refused_unions=dups.refused,
        label_conflicts=conflicts,
        near_rule=tuple(near),
    )


def _exclude_conflict(table: ManifestTable, members: list[int], labels: list[str]) -> None:
    """The same image under two labels: no copy can be trusted, all of them go."""
    for i in members:
        table.note(
            i, "duplicate", f"label conflict: the same image is labelled {' and '.join(labels)}"
        )


def _keep_one_copy(table: ManifestTable, members: list[int]) -> None:
    keeper = _keeper(table, members)
    for i in members:
        if i != keeper:
            kind = "exact" if table.pixel_hash[i] == table.pixel_hash[keeper] else "near"
            table.note(i, "duplicate", f"{kind} duplicate of {table.path[keeper]}")


def _keeper(table: ManifestTable, members: list[int]) -> int:
    """The copy to keep: the largest, then one needing no conversion, then the first path."""
    return min(
        members,
        key=lambda i: (-table.width[i] * table.height[i], table.status[i] != "ok", table.path[i]),
    )


# ------------------------------------------------------------------------------------ groups
def assign_groups(table: ManifestTable, group_rx, clusters_idx: list[list[int]]) -> int:
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


# ------------------------------------------------------------------------------------ split
def assign_split(
    table: ManifestTable, class_names, fractions, seed, predefined_spec, clusters
) -> dict | None:
    """Give every usable row its split: a seeded, group-aware split (returns None), or the
    predefined one (returns what it had to exclude)."""
    label_idx = {c: n for n, c in enumerate(class_names)}
    if predefined_spec is None:
        _seeded_split(table, label_idx, class_names, fractions, seed)
        return None
    return _predefined_split(table, label_idx, class_names, predefined_spec, clusters)


def _seeded_split(table: ManifestTable, label_idx, class_names, fractions, seed) -> None:
    usable = table.usable()
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


def _predefined_split(table: ManifestTable, label_idx, class_names, spec, clusters) -> dict:
    # every copy, including those excluded above, counts with its declared split
    declared = predefined_split(table.path, spec)
    crossing = _exclude_crossing_clusters(table, declared, clusters)
    unplaced = 0
    for i in table.usable():
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


def _exclude_crossing_clusters(table: ManifestTable, declared, clusters) -> list[dict]:
    """A duplicate cluster whose copies the dataset declares in different splits would leak: all of
    its copies are excluded. Returns those clusters."""
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
    return crossing
