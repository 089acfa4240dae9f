"""Near-duplicate candidates: which pairs of images are worth the aligned check
(`alignment.compare`).

Three sources, each cheap per pair and each filtered by a quick shift-tolerant correlation of small
thumbnails (`hashing.quick_correlation`) before anything costly:
- hash neighbours: pHash, or the pHash of the mirror image, within the rule's bits;
- registered hashes (registration.py): shifted, cropped and bordered copies register onto the same
  content;
- trimmed hashes: an image with uniform margins (a padded border, a shifted copy's fill) hashed
  with its margins cut off, against the other's plain pHash.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fer.prepare.hashing import THUMB, candidate_pairs, quick_correlation
from fer.prepare.image_ops import blur121, halve
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

PREFILTER_MIN_CORRELATION = 0.85  # the quick 32 px check before anything else
PREFILTER_16 = 0.75  # the same at 16 px first (shifts +-1 px)
# registered-hash candidates: plain correlation of the registered 16 px thumbnails first
REGISTERED_MIN_CORR16 = 0.80
REGISTERED_PREFILTER = 0.85  # then the quick check on registered thumbnails (shifts +-1 px)

_NO_PAIRS = np.zeros((0, 2), dtype=np.int64)


@dataclass(frozen=True)
class Candidates:
    """Candidate pairs (image indices), per pair whether j is compared mirrored, and its quick
    correlation (0 where the pair came from a registered or trimmed hash: such a pair is never
    accepted on its quick correlation alone)."""

    pairs: np.ndarray
    flips: np.ndarray
    quick: np.ndarray

    def plus(self, extra: np.ndarray) -> Candidates:
        """With the `extra` pairs added, unmirrored and without a quick correlation."""
        if not len(extra):
            return self
        flips = np.zeros(len(extra), dtype=bool)
        return Candidates(
            np.concatenate([self.pairs, extra]) if len(self.pairs) else extra,
            np.concatenate([self.flips, flips]) if len(self.flips) else flips,
            np.concatenate([self.quick, np.zeros(len(extra), dtype=np.float32)]),
        )


def find_candidates(
    sigs: np.ndarray, reps: np.ndarray, h: np.ndarray, hm: np.ndarray, max_bits: int
) -> Candidates:
    """The candidates among the images `reps` (one per set of exact copies), whose pHashes and
    mirror pHashes are `h` and `hm`; each pair is found once, by the first source that finds it."""
    pairs, flips = candidate_pairs(h, hm, max_bits)
    quick = np.zeros(0, dtype=np.float32)
    if len(pairs):
        pairs = reps[pairs]
        quick = _prefilter(sigs, pairs, flips)
        keep = quick >= PREFILTER_MIN_CORRELATION
        pairs, flips, quick = pairs[keep], flips[keep], quick[keep]
    found = Candidates(pairs, flips, quick)
    found = found.plus(_registered_candidates(sigs, reps, max_bits, found.pairs))
    return found.plus(_trimmed_candidates(sigs, reps, h, max_bits, found.pairs))


def _prefilter(sigs: np.ndarray, pairs: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """hashing.quick_correlation on 32 px thumbnails, j mirrored where its mirror hash matched;
    first the same at 16 px (shifts +-1 px, a sixteenth of the work): pairs below PREFILTER_16 keep
    that value."""
    used, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(pairs.shape)
    t = np.empty((len(used), THUMB, THUMB), dtype=np.uint8)
    t16 = np.empty((len(used), THUMB // 2, THUMB // 2), dtype=np.float16)
    # in chunks: a float copy of every signature would be 32 KiB each
    for start in range(0, len(used), 1024):
        x = halve(sigs[used[start : start + 1024]].astype(np.float32))
        t[start : start + 1024], t16[start : start + 1024] = _blur(x), halve(x)
    # mirror only the images that need it
    mirrored, at = np.unique(local[flips, 1], return_inverse=True)
    second = local[:, 1].copy()
    second[flips] = len(used) + at
    local = np.stack([local[:, 0], second], axis=1)
    quick = quick_correlation(np.concatenate([t16, t16[mirrored, :, ::-1]]), local, max_shift=1)
    del t16
    go = quick >= PREFILTER_16
    quick[go] = quick_correlation(np.concatenate([t, t[mirrored, :, ::-1]]), local[go], max_shift=2)
    return quick


# ------------------------------------------------------------------------------------ registered
def _registered_candidates(sigs, reps, max_bits, known) -> np.ndarray:
    """Pairs (image indices) whose registered hashes, or a probe of one and the registered hash of
    the other (registration.py: shifted, cropped and bordered copies register to the same content),
    are within `max_bits`, not already in `known`, and whose registered (or probe) thumbnails pass
    two quick checks: REGISTERED_MIN_CORR16 at 16 px, then REGISTERED_PREFILTER at 32 px. Never
    mirrored: that is the pHash's job."""
    offsets, hashes = register(sigs, reps, registration_template(sigs, reps))
    local, how = probe_pairs(hashes, max_bits)  # positions in `reps`
    if len(local) and len(known):
        new = _not_in(reps[local], known, len(sigs))
        local, how = local[new], how[new]
    if not len(local):
        return _NO_PAIRS
    # one thumbnail per (image, variant) that matched: 0 registered; odd `how`: i's probe, even: j's
    probe = (how + 1) // 2
    side = np.stack(
        [np.where(how % 2 == 1, probe, 0), np.where((how % 2 == 0) & (how > 0), probe, 0)], axis=1
    )
    keys, loc = np.unique(local * VARIANTS + side, return_inverse=True)
    loc = loc.reshape(local.shape)
    pos, variant = keys // VARIANTS, keys % VARIANTS  # positions in `reps` (and `offsets`)

    def thumbs(k):
        """uint8 32 px thumbnails of the matched variants `k` (indices into `keys`)."""
        return variant_thumbs(sigs, reps[pos[k]], offsets[pos[k]], variant[k])

    close = _correlation16(thumbs, len(keys), loc) >= REGISTERED_MIN_CORR16
    local, loc = local[close], loc[close]
    if not len(local):
        return _NO_PAIRS
    quick = _quick_on_variants(thumbs, loc)
    return reps[local[quick >= REGISTERED_PREFILTER]]


def _correlation16(thumbs, n_keys: int, loc: np.ndarray) -> np.ndarray:
    """The plain correlation at 16 px of each pair `loc` of thumbnails: a dot product per pair of
    float16 vectors (0.5 KiB per thumbnail), before the shift-tolerant check at 32 px on the
    survivors only."""
    small = np.empty((n_keys, (THUMB // 2) ** 2), dtype=np.float16)
    for start in range(0, n_keys, 1024):
        sl = slice(start, start + 1024)
        x = halve(thumbs(sl).astype(np.float32))
        x = x.reshape(len(x), -1) - x.mean(axis=(1, 2))[:, None]
        small[sl] = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-3)
    return np.concatenate(
        [
            np.einsum(
                "pk,pk->p",
                small[loc[s : s + 16384, 0]].astype(np.float32),
                small[loc[s : s + 16384, 1]].astype(np.float32),
            )
            for s in range(0, len(loc), 16384)
        ]
    )


def _quick_on_variants(thumbs, loc: np.ndarray) -> np.ndarray:
    """hashing.quick_correlation (shifts +-1 px) of each pair `loc` of blurred thumbnails."""
    shape = loc.shape
    used, loc = np.unique(loc, return_inverse=True)
    blurred = np.empty((len(used), THUMB, THUMB), dtype=np.uint8)
    for start in range(0, len(used), 1024):  # in chunks: a float copy of a thumbnail is 4 KiB
        blurred[start : start + 1024] = _blur(thumbs(used[start : start + 1024]))
    return quick_correlation(blurred, loc.reshape(shape), max_shift=1)


# ------------------------------------------------------------------------------------ trimmed
def _trimmed_candidates(sigs, reps, h, max_bits, known) -> np.ndarray:
    """Pairs (image indices) where one image has uniform margins (a padded border, a shifted copy's
    fill: registration.margins) and its trimmed hash is within `max_bits` of the other's pHash, not
    already in `known`, and whose 32 px thumbnails (the trimmed one for the image with margins)
    correlate at PREFILTER_MIN_CORRELATION or more (shifts +-2 px). A padded copy's face is
    smaller, by more than the pHash or the registration's single scale probe covers reliably."""
    margin = margins(sigs, reps)
    framed = np.flatnonzero((margin >= MARGIN_MIN).any(axis=1))
    if not len(framed):
        return _NO_PAIRS
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
        new = _not_in(pairs, known, len(sigs))
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


def _not_in(pairs: np.ndarray, known: np.ndarray, n: int) -> np.ndarray:
    """Per pair (i, j), whether it is not among the `known` pairs (image indices below `n`)."""
    return ~np.isin(pairs[:, 0] * n + pairs[:, 1], known[:, 0] * n + known[:, 1])


def _blur(t: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 in both directions (about a 0.7 px Gaussian), edges replicated, rounded: sub-pixel
    shifts of thin features (eyes, mouth lines, noise) then cost little correlation."""
    return np.rint(blur121(t))
