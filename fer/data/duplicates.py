"""Exact and near duplicates, clustered with union-find.

Exact: equal decoded pixels (a PNG and a lossless WebP of one image match though their bytes differ).
Near: pHash within `NEAR_PHASH_BITS` of 64 and shift-tolerant thumbnail correlation of at least
`NEAR_MIN_CORRELATION` (see hashing.py for why both). A cluster is every image connected by such pairs.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from fer.data.hashing import candidate_pairs, hashes_to_array, shift_correlation

NEAR_PHASH_BITS = 12
NEAR_MIN_CORRELATION = 0.94


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
    near_pairs: list[tuple[int, int]]  # near but not pixel-identical
    clusters: list[list[int]]  # clusters of 2+ items, each sorted, the list sorted by first member


def find_duplicates(pixel_hashes: list[str], phashes: list[str], thumbs: np.ndarray,
                    max_bits: int = NEAR_PHASH_BITS, min_correlation: float = NEAR_MIN_CORRELATION
                    ) -> Duplicates:
    """`thumbs`: uint8 (n, 32, 32) from `hashing.thumbnail`, same order as the hashes."""
    n = len(pixel_hashes)
    by_pixels: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(pixel_hashes):
        by_pixels[h].append(i)
    exact = [(members[0], j) for members in by_pixels.values() if len(members) > 1 for j in members[1:]]
    first_copy = {i: members[0] for members in by_pixels.values() for i in members}
    near: list[tuple[int, int]] = []
    if n > 1:
        pairs = candidate_pairs(hashes_to_array(phashes), max_bits)
        pairs = pairs[[first_copy[i] != first_copy[j] for i, j in pairs]] if len(pairs) else pairs
        if len(pairs):
            confirmed = pairs[shift_correlation(thumbs, pairs) >= min_correlation]
            near = [(int(i), int(j)) for i, j in confirmed]
    uf = UnionFind(n)
    for i, j in exact + near:
        uf.union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    clusters = sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    return Duplicates(exact, near, clusters)
