"""Exact and near duplicates, and the clusters they form (definition: docs/duplicates.md).

Exact: equal decoded pixels (a PNG and a lossless WebP of one image match though their bytes
differ). Near: candidates whose pHash, or the pHash of the mirror image, is within `NEAR_PHASH_BITS`
of 64, or whose registered hashes are, or the probe hash of one and the registered hash of the other
(fer/prepare/registration.py: each image shifted onto the dataset's mean face and its central 80 %
hashed, plus a zoomed and a second-peak probe, so shifted, cropped and bordered copies become
candidates too), or, for an image with uniform margins (a padded border, a shifted copy's fill),
whose trimmed hash is within those bits of the other's pHash (registration.margins,
registration.trim), confirmed by `hashing.compare` (aligned 64x64 signatures): global correlation at
least `NEAR_MIN_CORRELATION` and no 16x16 window differing by more than `NEAR_MAX_LOCAL` (that is
where another expression of the same face shows: mouth, eyes, brows). The thresholds were chosen
from measured distributions on the calibration part of benchmarks/duplicates_eval.py (FER2013
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

from fer.prepare.hashing import (
    THUMB,
    candidate_pairs,
    compare,
    halve,
    hashes_to_array,
    quick_correlation,
)
from fer.prepare.registration import (
    MARGIN_MIN,
    VARIANTS,
    margins,
    probe_pairs,
    register,
    registration_template,
    trim,
    trimmed_hashes,
    variant_thumbs,
)

NEAR_PHASH_BITS = 12
PREFILTER_MIN_CORRELATION = (
    0.85  # cheap 32 px check (hashing.quick_correlation) before anything else
)
# the same at 16 px first (shifts +-1 px): calibration pairs that pass the 32 px check reach >= 0.77
# there
PREFILTER_16 = 0.75
REGISTERED_MIN_CORR16 = (
    0.80  # registered-hash candidates: plain correlation of the registered 16 px thumbnails first
)
REGISTERED_PREFILTER = 0.85  # then the quick check on registered thumbnails (shifts +-1 px)
# same-label pairs this close at 32 px are copies without the aligned check (different JAFFE people,
# same expression: <= 0.92 on calibration)
SAME_LABEL_MIN_QUICK = 0.95
SAME_LABEL_MAX_LOCAL = (
    0.15  # same-label pairs: the aligned check without the expression-level strictness
)
NEAR_MIN_CORRELATION = 0.90
NEAR_MAX_LOCAL = 0.075
LOOSE_MIN_CORRELATION = 0.85
LOOSE_MAX_LOCAL = 0.09
MAX_GROUP_CHECK = 300  # larger connected groups are split by the pair rule alone (no cross check)


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
    max_bits: int = NEAR_PHASH_BITS,
    min_correlation: float = NEAR_MIN_CORRELATION,
    max_local: float = NEAR_MAX_LOCAL,
    labels: list[str] | None = None,
) -> Duplicates:
    """`sigs`: uint8 (n, 64, 64) from `hashing.signature`, same order as the hashes. With `labels`,
    the cluster check only asks differently labelled images to be confirmed copies of each other
    directly."""
    n = len(pixel_hashes)
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(pixel_hashes):
        by_pixels[h].append(i)
    exact = [
        (members[0], j) for members in by_pixels.values() if len(members) > 1 for j in members[1:]
    ]
    reps = np.array(sorted(members[0] for members in by_pixels.values()), dtype=np.int64)
    near, scores, refused = [], [], 0
    uf = UnionFind(n)
    for i, j in exact:
        uf.union(i, j)
    if len(reps) > 1:
        h, hm = (
            hashes_to_array([phashes[i] for i in reps]),
            hashes_to_array([phashes_mirror[i] for i in reps]),
        )
        pairs, flips = candidate_pairs(h, hm, max_bits)
        quick = np.zeros(0, dtype=np.float32)
        if len(pairs):
            pairs = reps[pairs]
            quick = _prefilter(sigs, pairs, flips)
            keep = quick >= PREFILTER_MIN_CORRELATION
            pairs, flips, quick = pairs[keep], flips[keep], quick[keep]
        extra, extra_flips, _ = _registered_candidates(sigs, reps, max_bits, pairs)
        if len(extra):
            pairs = np.concatenate([pairs, extra]) if len(pairs) else extra
            flips = np.concatenate([flips, extra_flips]) if len(flips) else extra_flips
            quick = np.concatenate(
                [quick, np.zeros(len(extra), dtype=np.float32)]
            )  # no quick acceptance
        extra = _trimmed_candidates(sigs, reps, h, max_bits, pairs)
        if len(extra):
            extra_flips = np.zeros(len(extra), dtype=bool)
            pairs = np.concatenate([pairs, extra]) if len(pairs) else extra
            flips = np.concatenate([flips, extra_flips]) if len(flips) else extra_flips
            quick = (
                np.concatenate([quick, np.zeros(len(extra), dtype=np.float32)])
                if len(quick)
                else np.zeros(len(extra), dtype=np.float32)
            )  # never the quick same-label acceptance
        if len(pairs):
            confirmed, checked = _confirm(
                sigs, pairs, flips, quick, labels, min_correlation, max_local
            )
            hashes = (
                {int(i): int(x) for i, x in zip(reps, h)},
                {int(i): int(x) for i, x in zip(reps, hm)},
            )
            near, scores, refused = _cluster_near(
                sigs, confirmed, uf, labels, min_correlation, max_local, hashes, checked
            )
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    clusters = sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    return Duplicates(exact, near, scores, clusters, refused)


def _confirm(sigs, pairs, flips, quick, labels, min_correlation, max_local) -> tuple[list, dict]:
    """Confirmed pairs as (i, j, scores), and whether each differently labelled pair passed the
    strict check (the cluster check reuses it). Differently labelled pairs (or all, without labels)
    must pass the strict aligned check: they would become label conflicts, and another expression of
    the same person is exactly what must not. Same-label pairs may at worst be two takes of one
    expression (allowed to cluster): very close at 32 px is enough, otherwise the aligned check with
    a looser local limit."""
    same = (
        np.zeros(len(pairs), dtype=bool)
        if labels is None
        else np.array([labels[i] == labels[j] for i, j in pairs], dtype=bool)
    )
    easy = same & (quick >= SAME_LABEL_MIN_QUICK)
    out = [
        (
            int(i),
            int(j),
            {
                "corr": _plain(q),
                "local": 0.0,
                "mirror": bool(f),
                "zoom": 1.0,
                "shift": 0.0,
                "check": "quick",
            },
        )
        for (i, j), q, f in zip(pairs[easy], quick[easy], flips[easy])
    ]
    hard = ~easy
    if hard.any():
        res = compare(sigs, pairs[hard], flips[hard], min_corr=min_correlation)
        limit = np.where(same[hard], SAME_LABEL_MAX_LOCAL, max_local)
        ok = (res["corr"] >= min_correlation) & (res["local"] <= limit)
        for k, (i, j) in enumerate(pairs[hard]):
            if ok[k]:
                out.append(
                    (
                        int(i),
                        int(j),
                        {**{key: _plain(v[k]) for key, v in res.items()}, "check": "aligned"},
                    )
                )
        strict = ~same[hard]
        checked = dict(zip(map(tuple, pairs[hard][strict].tolist()), ok[strict].tolist()))
    else:
        checked = {}
    return out, checked


def _trimmed_candidates(sigs, reps, h, max_bits, known) -> np.ndarray:
    """Pairs (image indices) where one image has uniform margins (a padded border, a shifted copy's
    fill: registration.margins) and its trimmed hash is within `max_bits` of the other's pHash, not
    already in `known`, and whose 32 px thumbnails (the trimmed one for the image with margins)
    correlate at PREFILTER_MIN_CORRELATION or more (shifts +-2 px). A padded copy's face is smaller
    by 4-14 %, which neither the pHash nor the registration's single scale probe covers reliably."""
    margin = margins(sigs, reps)
    framed = np.flatnonzero((margin >= MARGIN_MIN).any(axis=1))
    if not len(framed):
        return np.zeros((0, 2), dtype=np.int64)
    trimmed = trimmed_hashes(sigs, reps[framed], margin[framed])
    found = [  # (framed x all) in blocks of 32 rows: memory stays flat
        np.nonzero(np.bitwise_count(trimmed[s : s + 32, None] ^ h[None, :]) <= max_bits)
        for s in range(0, len(framed), 32)
    ]
    r = np.concatenate([rr + 32 * k for k, (rr, _) in enumerate(found)])
    c = np.concatenate([cc for _, cc in found])
    keep = framed[r] != c
    a, b = framed[r[keep]], c[keep]  # a: the image with margins, trimmed; b: as it is
    pairs = np.stack([np.minimum(reps[a], reps[b]), np.maximum(reps[a], reps[b])], axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    a, b = a[first], b[first]
    if len(known):
        n = len(sigs)
        new = ~np.isin(pairs[:, 0] * n + pairs[:, 1], known[:, 0] * n + known[:, 1])
        pairs, a, b = pairs[new], a[new], b[new]
    if not len(pairs):
        return pairs
    ua, la = np.unique(a, return_inverse=True)
    ub, lb = np.unique(b, return_inverse=True)
    thumbs = np.concatenate(
        [
            _blur(halve(trim(sigs, reps[ua], margin[ua]))),
            _blur(halve(sigs[reps[ub]].astype(np.float32))),
        ]
    ).astype(np.uint8)
    quick = quick_correlation(thumbs, np.stack([la, len(ua) + lb], axis=1), max_shift=2)
    return pairs[quick >= PREFILTER_MIN_CORRELATION]


_NONE = np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float32)


def _registered_candidates(
    sigs, reps, max_bits, known
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (image indices) whose registered hashes, or a probe of one and the registered hash of
    the other (fer/prepare/registration.py: shifted, cropped and bordered copies register to the
    same content), are within `max_bits`, not already in `known`, and whose registered (or probe)
    thumbnails correlate at REGISTERED_PREFILTER or more; with per pair whether j is mirrored
    (never: that is the pHash's job) and that correlation."""
    offsets, hashes = register(sigs, reps, registration_template(sigs, reps))
    local, how = probe_pairs(hashes, max_bits)
    if len(local) and len(known):
        n = len(sigs)
        mine = reps[local[:, 0]] * n + reps[local[:, 1]]
        new = ~np.isin(mine, known[:, 0] * n + known[:, 1])
        local, how = local[new], how[new]
    if not len(local):
        return _NONE
    # which variant of each side matched: 0 registered; odd `how`: i's probe, even: j's probe
    probe = (how + 1) // 2
    side = np.stack(
        [np.where(how % 2 == 1, probe, 0), np.where((how % 2 == 0) & (how > 0), probe, 0)], axis=1
    )
    keys, loc = np.unique(local * VARIANTS + side, return_inverse=True)
    loc = loc.reshape(local.shape)
    pos, variant = keys // VARIANTS, keys % VARIANTS  # positions in `reps` (and `offsets`)
    # first the plain correlation at 16 px (a dot product per pair; float16 vectors, 0.5 KiB per
    # image and variant), then the shift-tolerant one at 32 px on the survivors' thumbnails only
    small = np.empty((len(keys), (THUMB // 2) ** 2), dtype=np.float16)
    for start in range(0, len(keys), 1024):
        sl = slice(start, start + 1024)
        x = halve(
            variant_thumbs(sigs, reps[pos[sl]], offsets[pos[sl]], variant[sl]).astype(np.float32)
        )
        x = x.reshape(len(x), -1) - x.mean(axis=(1, 2))[:, None]
        small[sl] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-3)
    close = np.concatenate(
        [
            np.einsum(
                "pk,pk->p",
                small[loc[s : s + 16384, 0]].astype(np.float32),
                small[loc[s : s + 16384, 1]].astype(np.float32),
            )
            for s in range(0, len(loc), 16384)
        ]
    )
    del small
    close = close >= REGISTERED_MIN_CORR16
    local, loc = local[close], loc[close]
    if not len(local):
        return _NONE
    used, loc = np.unique(loc, return_inverse=True)
    blurred = np.empty((len(used), THUMB, THUMB), dtype=np.uint8)
    for start in range(0, len(used), 1024):  # in chunks: a float copy of a thumbnail is 4 KiB
        k = used[start : start + 1024]
        blurred[start : start + 1024] = _blur(
            variant_thumbs(sigs, reps[pos[k]], offsets[pos[k]], variant[k])
        )
    quick = quick_correlation(blurred, loc.reshape(local.shape), max_shift=1)
    keep = quick >= REGISTERED_PREFILTER
    return reps[local[keep]], np.zeros(int(keep.sum()), dtype=bool), quick[keep]


def _prefilter(sigs: np.ndarray, pairs: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """hashing.quick_correlation on 32 px thumbnails, j mirrored where its mirror hash matched;
    first the same at 16 px (shifts +-1 px, a sixteenth of the work): pairs below PREFILTER_16 keep
    that value."""
    used, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(pairs.shape)
    t = np.empty((len(used), THUMB, THUMB), dtype=np.uint8)
    t16 = np.empty((len(used), THUMB // 2, THUMB // 2), dtype=np.float16)
    for start in range(
        0, len(used), 1024
    ):  # in chunks: a float copy of every signature would be 32 KiB each
        x = halve(sigs[used[start : start + 1024]].astype(np.float32))
        t[start : start + 1024], t16[start : start + 1024] = _blur(x), halve(x)
    mirrored, at = np.unique(
        local[flips, 1], return_inverse=True
    )  # mirror only the images that need it
    second = local[:, 1].copy()
    second[flips] = len(used) + at
    local = np.stack([local[:, 0], second], axis=1)
    quick = quick_correlation(np.concatenate([t16, t16[mirrored, :, ::-1]]), local, max_shift=1)
    del t16
    go = quick >= PREFILTER_16
    quick[go] = quick_correlation(np.concatenate([t, t[mirrored, :, ::-1]]), local[go], max_shift=2)
    return quick


def _plain(x):
    return bool(x) if isinstance(x, np.bool_) else round(float(x), 4)


def _strength(s: dict) -> float:
    return s["corr"] - s["local"]


def _blur(t: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 in both directions (about a 0.7 px Gaussian), edges replicated: sub-pixel shifts of
    thin features (eyes, mouth lines, noise) then cost little correlation."""
    p = np.pad(t, ((0, 0), (1, 1), (0, 0)), mode="edge")
    t = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    p = np.pad(t, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return np.rint(0.25 * p[:, :, :-2] + 0.5 * p[:, :, 1:-1] + 0.25 * p[:, :, 2:])


def _cluster_near(
    sigs, confirmed, uf: UnionFind, labels, min_correlation, max_local, hashes=None, checked=None
):
    """Merge confirmed pairs strongest first; within a connected group of 3+ images, two
    sub-clusters merge only if all their cross pairs pass the loose check (with `labels`: only the
    differently labelled cross pairs, and they must pass the strict check, i.e. be copies of each
    other directly; `checked`: the strict results `_confirm` already has). Returns (pairs used,
    their scores, number of refused merges)."""
    comp = UnionFind(len(sigs))
    for a, b, _ in confirmed:
        comp.union(a, b)
    members: dict[int, set[int]] = defaultdict(set)
    for a, b, _ in confirmed:
        members[comp.find(a)].update((a, b))
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
    passes: dict[tuple[int, int], bool] = {}
    if checked and labels is not None:
        passes = {pair: checked[pair] for pair in todo if pair in checked}
        todo = [pair for pair in todo if pair not in checked]
    if todo and hashes is not None:  # compare j mirrored where its mirror hash is the closer one
        h, hm = hashes
        mirror = np.array([(h[i] ^ hm[j]).bit_count() < (h[i] ^ h[j]).bit_count() for i, j in todo])
    else:
        mirror = None  # both orientations
    if todo:
        res = compare(
            sigs,
            np.array(todo, dtype=np.int64),
            mirror,
            min_corr=LOOSE_MIN_CORRELATION if labels is None else min_correlation,
        )
        if labels is None:
            ok = (res["corr"] >= LOOSE_MIN_CORRELATION) & (res["local"] <= LOOSE_MAX_LOCAL)
        else:
            ok = (res["corr"] >= min_correlation) & (res["local"] <= max_local)
        passes.update({pair: bool(p) for pair, p in zip(todo, ok)})
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
