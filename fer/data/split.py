"""Assigning images to train/val/test: stratified by class, groups kept whole, deterministic per
seed.

A group is everything that must not straddle splits: one subject (from `--group-regex`) and every
duplicate cluster. Groups are placed largest first (ties in seeded random order) into the split
whose per-class targets they fill best, which keeps each class close to the requested fractions even
when a subject holds images of several classes.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from fer.core.errors import UserError

SPLITS = ("train", "val", "test")


def parse_fractions(text_or_tuple) -> tuple[float, float, float]:
    if isinstance(text_or_tuple, str):
        try:
            parts = tuple(float(x) for x in text_or_tuple.split(","))
        except ValueError:
            raise UserError(
                f"--split must be three numbers like 0.7,0.15,0.15, got {text_or_tuple!r}"
            ) from None
    else:
        parts = tuple(float(x) for x in text_or_tuple)
    if len(parts) != 3 or any(p <= 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        raise UserError(
            f"--split needs three positive fractions summing to 1 (train,val,test), got {parts}"
        )
    return parts  # type: ignore[return-value]


def group_split(
    labels: np.ndarray,
    groups: list[str],
    n_classes: int,
    fractions,
    seed: int,
    largest_first: bool = True,
) -> np.ndarray:
    """Return a split index (0 train, 1 val, 2 test) per image; images of one group share it.

    `largest_first=False` places the groups in a purely seeded random order: the fractions are kept
    less tightly, but with few groups (10 people) different seeds then give different splits, where
    largest-first mostly puts the same big groups in the same place whatever the seed."""
    fractions = np.asarray(fractions, dtype=float)
    names, group_idx = np.unique(np.asarray(groups, dtype=object), return_inverse=True)
    counts = np.zeros((len(names), n_classes))
    np.add.at(counts, (group_idx, labels), 1)
    class_totals = counts.sum(axis=0)
    targets = fractions[:, None] * class_totals[None, :]  # (3, classes)
    filled = np.zeros_like(targets)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    if largest_first:
        order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    assignment = np.empty(len(names), dtype=np.int64)
    for g in order:
        need = (targets - filled) / np.maximum(
            targets, 1e-9
        )  # relative deficit per split and class
        score = (need * counts[g][None, :]).sum(axis=1) / counts[g].sum()
        s = int(np.argmax(score))
        assignment[g] = s
        filled[s] += counts[g]
    return assignment[group_idx]


def check_every_split_has_every_class(
    labels: np.ndarray, split_idx: np.ndarray, classes: list[str], how: str
) -> None:
    for c, name in enumerate(classes):
        mine = split_idx[labels == c]
        missing = [SPLITS[s] for s in range(3) if not np.any(mine == s)]
        if missing:
            raise UserError(
                f"class '{name}' has {len(mine)} usable image(s), none of them in "
                f"{', '.join(missing)} ({how}); every class needs images in train, val and test: "
                "add images, merge or drop the class, or loosen --group-regex"
            )


def parse_predefined(spec) -> dict[str, str] | Path:
    """`train=^Training_,val=^PublicTest_,test=^PrivateTest_` -> patterns; an existing .csv -> its
    Path."""
    if isinstance(spec, dict):
        patterns = dict(spec)
    else:
        text = str(spec)
        if Path(text).suffix.lower() == ".csv":
            if not Path(text).is_file():
                raise UserError(f"predefined split CSV not found: {text}")
            return Path(text)
        patterns = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise UserError(
                    f"--predefined expects split=REGEX pairs or a CSV file, got {part!r}"
                )
            patterns[key.strip()] = value.strip()
    if set(patterns) != set(SPLITS):
        raise UserError(
            f"--predefined must give a pattern for each of train, val, test; got {sorted(patterns)}"
        )
    for key, value in patterns.items():
        try:
            re.compile(value)
        except re.error as exc:
            raise UserError(
                f"--predefined {key} pattern {value!r} is not a valid regex: {exc}"
            ) from None
    return patterns


def predefined_split(paths: list[str], spec: dict[str, str] | Path) -> list[str | None]:
    """The predefined split of each path (None when the definition does not place it)."""
    if isinstance(spec, Path):
        table: dict[str, str] = {}
        with open(spec, newline="") as f:
            for row in csv.DictReader(f):
                if "path" not in row or "split" not in row:
                    raise UserError(f"{spec} must have the columns path,split")
                split = row["split"].strip()
                if split not in SPLITS:
                    raise UserError(
                        f"{spec}: split {split!r} for {row['path']} is not train, val or test"
                    )
                table[row["path"].strip().replace("\\", "/")] = split
        return [table.get(p) for p in paths]
    compiled = [(s, re.compile(spec[s])) for s in SPLITS]
    out: list[str | None] = []
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        hits = [s for s, rx in compiled if rx.search(name)]
        out.append(hits[0] if len(hits) == 1 else None)
    return out
