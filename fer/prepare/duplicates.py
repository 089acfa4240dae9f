"""Exact and near duplicates, and the clusters they form (definition: docs/duplicates.md).

Exact: equal decoded pixels (a PNG and a lossless WebP of one image match though their bytes
differ). Near: a candidate pair (candidates.py: pHash or mirror pHash neighbours, registered and
trimmed hashes) confirmed by the aligned check (`alignment.compare` on 64x64 signatures): global
correlation at least `NearRule.min_correlation` and no 16x16 window differing by more than
`NearRule.max_local` (that is where another expression of the same face shows: mouth, eyes, brows).
The thresholds were chosen on the calibration part of benchmarks/duplicates_eval.py (FER2013
Training files with edited copies, five JAFFE subjects) and scored on the held-out part; the figures
are in docs/duplicates.md.

Clusters are judged as a whole, not as chains of pairs: within a connected group, images are merged
in order of pair strength, and two sub-clusters merge only if every cross pair passes the looser
check (`LOOSE_*`), so a chain a~b~c cannot put two different expressions a and c into one cluster.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from fer.prepare.alignment import compare
from fer.prepare.candidates import Candidates, find_candidates
from fer.prepare.hashing import hashes_to_array

NEAR_PHASH_BITS = 12
NEAR_MIN_CORRELATION = 0.90
NEAR_MAX_LOCAL = 0.075
# same-label pairs this close at 32 px are copies without the aligned check (different people with
# the same expression stay below it)
SAME_LABEL_MIN_QUICK = 0.95
# same-label pairs: the aligned check without the expression-level strictness
SAME_LABEL_MAX_LOCAL = 0.15
LOOSE_MIN_CORRELATION = 0.85
LOOSE_MAX_LOCAL = 0.09
MAX_GROUP_CHECK = 300  # larger connected groups are split by the pair rule alone (no cross check)


@dataclasses.dataclass(frozen=True)
class NearRule:
    """When a candidate pair is a near duplicate: pHash neighbours within `max_bits` (of 64), then
    the aligned check's global correlation and largest local difference."""

    max_bits: int = NEAR_PHASH_BITS
    min_correlation: float = NEAR_MIN_CORRELATION
    max_local: float = NEAR_MAX_LOCAL


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


@dataclasses.dataclass
class Duplicates:
    exact_pairs: list[tuple[int, int]]  # indices into the hashed items
    near_pairs: list[tuple[int, int]]  # confirmed near pairs joined into clusters
    near_scores: list[dict]  # per near pair: corr, local, mirror, zoom, shift
    clusters: list[list[int]]  # clusters of 2+ items, each sorted, the list sorted by first member
    refused: int = 0  # confirmed pairs left apart because their clusters failed the cross check


def find_duplicates(
    pixel_hashes: list[str],
    phashes: list[str],
    phashes_mirror: list[str],
    sigs: np.ndarray,
    rule: NearRule = NearRule(),
    labels: list[str] | None = None,
) -> Duplicates:
    """`sigs`: uint8 (n, 64, 64) from `hashing.signature`, same order as the hashes. With `labels`,
    the cluster check only asks differently labelled images to be confirmed copies of each other
    directly."""
    n = len(pixel_hashes)
    exact, reps = _exact_pairs(pixel_hashes)
    uf = UnionFind(n)
    for i, j in exact:
        uf.union(i, j)
    near, scores, refused = [], [], 0
    if len(reps) > 1:
        h = hashes_to_array([phashes[i] for i in reps])
        hm = hashes_to_array([phashes_mirror[i] for i in reps])
        found = find_candidates(sigs, reps, h, hm, rule.max_bits)
        if len(found.pairs):
            confirmed, checked = _confirm(sigs, found, labels, rule)
            hashes = (
                {int(i): int(x) for i, x in zip(reps, h)},
                {int(i): int(x) for i, x in zip(reps, hm)},
            )
            near, scores, refused = _cluster_near(
                sigs, confirmed, uf, labels, rule, hashes, checked
            )
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    clusters = sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    return Duplicates(exact, near, scores, clusters, refused)


def _exact_pairs(pixel_hashes: list[str]) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(pairs of equal pixels, each copy with the first of its pixels; the first image of each
    distinct pixel hash, sorted): only those representatives are searched for near duplicates."""
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(pixel_hashes):
        by_pixels[h].append(i)
    exact = [
        (members[0], j) for members in by_pixels.values() if len(members) > 1 for j in members[1:]
    ]
    reps = np.array(sorted(members[0] for members in by_pixels.values()), dtype=np.int64)
    return exact, reps


# ------------------------------------------------------------------------------------ confirming
def _confirm(sigs, found: Candidates, labels, rule: NearRule) -> tuple[list, dict]:
    """Confirmed pairs as (i, j, scores), and whether each differently labelled pair passed the
    strict check (the cluster check reuses it). Differently labelled pairs (or all, without labels)
    must pass the strict aligned check: they would become label conflicts, and another expression of
    the same person is exactly what must not. Same-label pairs may at worst be two takes of one
    expression (allowed to cluster): very close at 32 px is enough, otherwise the aligned check with
    a looser local limit."""
    pairs, flips, quick = found.pairs, found.flips, found.quick
    same = (
        np.zeros(len(pairs), dtype=bool)
        if labels is None
        else np.array([labels[i] == labels[j] for i, j in pairs], dtype=bool)
    )
    easy = same & (quick >= SAME_LABEL_MIN_QUICK)
    out = [
        (int(i), int(j), _quick_scores(q, f))
        for (i, j), q, f in zip(pairs[easy], quick[easy], flips[easy])
    ]
    hard = ~easy
    if not hard.any():
        return out, {}
    res = compare(sigs, pairs[hard], flips[hard], min_corr=rule.min_correlation)
    limit = np.where(same[hard], SAME_LABEL_MAX_LOCAL, rule.max_local)
    ok = (res["corr"] >= rule.min_correlation) & (res["local"] <= limit)
    for k, (i, j) in enumerate(pairs[hard]):
        if ok[k]:
            scores = {key: _plain(v[k]) for key, v in res.items()}
            out.append((int(i), int(j), {**scores, "check": "aligned"}))
    strict = ~same[hard]
    checked = dict(zip(map(tuple, pairs[hard][strict].tolist()), ok[strict].tolist()))
    return out, checked


def _quick_scores(quick: float, flip: bool) -> dict:
    """The scores of a pair accepted on its quick correlation (no alignment was done)."""
    return {
        "corr": _plain(quick),
        "local": 0.0,
        "mirror": bool(flip),
        "zoom": 1.0,
        "shift": 0.0,
        "check": "quick",
    }


def _plain(x):
    return bool(x) if isinstance(x, np.bool_) else round(float(x), 4)


# ------------------------------------------------------------------------------------ clustering
def _cluster_near(
    sigs, confirmed, uf: UnionFind, labels, rule: NearRule, hashes=None, checked=None
):
    """Merge confirmed pairs strongest first; within a connected group of 3+ images, two
    sub-clusters merge only if all their cross pairs pass the loose check (with `labels`: only the
    differently labelled cross pairs, and they must pass the strict check, i.e. be copies of each
    other directly; `checked`: the strict results `_confirm` already has). Returns (pairs used,
    their scores, number of refused merges)."""
    members = _connected_groups(len(sigs), confirmed)
    todo = _cross_pairs(members, labels)
    passes: dict[tuple[int, int], bool] = {}
    if checked and labels is not None:
        passes = {pair: checked[pair] for pair in todo if pair in checked}
        todo = [pair for pair in todo if pair not in checked]
    if todo:
        passes.update(_cross_check(sigs, todo, labels, rule, hashes))
    return _merge_strongest_first(confirmed, members, passes, uf)


def _connected_groups(n: int, confirmed) -> dict[int, set[int]]:
    """The images of each connected group of confirmed pairs."""
    comp = UnionFind(n)
    for a, b, _ in confirmed:
        comp.union(a, b)
    members: dict[int, set[int]] = defaultdict(set)
    for a, b, _ in confirmed:
        members[comp.find(a)].update((a, b))
    return members


def _cross_pairs(members: dict[int, set[int]], labels) -> list[tuple[int, int]]:
    """The pairs the cluster check needs: within each group of 3 to MAX_GROUP_CHECK images, every
    pair (with `labels`: every differently labelled pair, in groups of mixed labels only)."""
    todo = []
    for group in members.values():
        if 2 < len(group) <= MAX_GROUP_CHECK and (
            labels is None or len({labels[i] for i in group}) > 1
        ):
            g = sorted(group)
            todo += [
                (g[x], g[y])
                for x in range(len(g))
                for y in range(x + 1, len(g))
                if labels is None or labels[g[x]] != labels[g[y]]
            ]
    return todo


def _cross_check(sigs, todo, labels, rule: NearRule, hashes) -> dict[tuple[int, int], bool]:
    """Whether each pair in `todo` passes: the loose check, or with `labels` the strict one."""
    if hashes is not None:  # compare j mirrored where its mirror hash is the closer one
        h, hm = hashes
        mirror = np.array([(h[i] ^ hm[j]).bit_count() < (h[i] ^ h[j]).bit_count() for i, j in todo])
    else:
        mirror = None  # both orientations
    res = compare(
        sigs,
        np.array(todo, dtype=np.int64),
        mirror,
        min_corr=LOOSE_MIN_CORRELATION if labels is None else rule.min_correlation,
    )
    if labels is None:
        ok = (res["corr"] >= LOOSE_MIN_CORRELATION) & (res["local"] <= LOOSE_MAX_LOCAL)
    else:
        ok = (res["corr"] >= rule.min_correlation) & (res["local"] <= rule.max_local)
    return {pair: bool(p) for pair, p in zip(todo, ok)}


def _merge_strongest_first(confirmed, members, passes, uf: UnionFind):
    """Join the confirmed pairs into `uf`, strongest first, unless a cross pair of the two
    sub-clusters failed the check in `passes`. Returns (pairs used, their scores, refused)."""
    cluster_of = {i: {i} for g in members.values() for i in g}
    used, scores, refused = [], [], 0
    for a, b, s in sorted(confirmed, key=lambda t: -_strength(t[2])):
        ca, cb = cluster_of[a], cluster_of[b]
        if ca is cb:
            used.append((a, b))
            scores.append(s)
            continue
        if passes and not all(passes.get((min(x, y), max(x, y)), True) for x in ca for y in cb):
            refused += 1
            continue
        merged = ca | cb
        for i in merged:
            cluster_of[i] = merged
        uf.union(a, b)
        used.append((a, b))
        scores.append(s)
    return used, scores, refused


def _strength(s: dict) -> float:
    return s["corr"] - s["local"]
