"""Registered hashes: shift- and scale-tolerant candidates for near duplicates (docs/duplicates.md).

pHash is not shift-invariant: a copy shifted by 5-10 %, cropped or padded with a border differs from
its source in most bits. Each image is therefore registered to the dataset's mean face (the shift
where its blurred 32 px thumbnail correlates best with the mean face's centre) and its central 80 %
around that shift is hashed again: a shifted copy registers onto the same content, so its registered
hash is close to its source's. The registration is shift-only and the mean face is a weak template
for faces that are not frontal, so each image also gets two **probe** hashes, compared with the
others' registered hashes:
- the central 72 % (zoom 0.9) at the same shift: a padded border shrinks the face and a crop
  enlarges it, which a shift cannot undo (the probe of the bordered copy, or of the cropped copy's
  source, matches the other's registered hash);
- the central 80 % at the second-best correlation peak (at least 3 px from the best): where a
  shifted copy makes the registration pick another peak, one image's second peak is usually the
  other's first.

Borders and fills defeat the registration most often (a black or white frame moves the correlation
peak), so images with **uniform margins** (`margins`: edge lines that are nearly constant, as a
padded border or a shifted copy's fill leave them) also get a **trimmed hash**: the pHash of the
image with its margins cut off and the rest stretched back (`trim`), compared with every image's
plain pHash. A padded copy trimmed is its source again (up to resampling). What each signal adds,
on the calibration fixtures of benchmarks/duplicates_eval.py: docs/duplicates.md.
"""

from __future__ import annotations

import numpy as np

from fer.prepare.hashing import THUMB, phash_array, sparse_nonzero
from fer.prepare.image_ops import (
    blur121,
    halve,
    interp_weights,
    normalise,
    resample,
    window_sums,
)

REG_WINDOW = 16  # template: the central 16x16 of the 32 px mean face
# shifts searched: +-6 px at 32 px (19 %; a wider search registers copies less often)
REG_RADIUS = 6
# the registered hash covers the central 80 % (fill, borders and watermarks at the edges drop out)
REG_CENTRAL = 0.8
PROBE_ZOOM = 0.9  # the scale probe: central 72 %
# the second peak is the best one at least this many pixels (32 px) from the first
SECOND_PEAK_GAP = 3
VARIANTS = 3  # 0: registered, 1: scale probe, 2: second-peak probe


def registration_template(sigs: np.ndarray, rows: np.ndarray, sample: int = 4096) -> np.ndarray:
    """The central REG_WINDOW pixels of the mean (normalised, blurred) 32 px image of up to `sample`
    evenly spaced images, zero mean and unit norm."""
    pick = rows[np.linspace(0, len(rows) - 1, min(len(rows), sample)).round().astype(np.int64)]
    mean = np.zeros((THUMB, THUMB))
    for start in range(0, len(pick), 1024):  # in chunks: a float copy of a signature is 16 KiB
        mean += normalise(blur121(halve(sigs[pick[start : start + 1024]].astype(np.float32)))).sum(
            axis=0
        )
    m = (THUMB - REG_WINDOW) // 2
    t = mean[m : m + REG_WINDOW, m : m + REG_WINDOW]
    t = t - t.mean()
    return (t / max(np.linalg.norm(t), 1e-9)).astype(np.float32)


def register(
    sigs: np.ndarray, rows: np.ndarray, template: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, hashes). offsets: float32 (len(rows), 4), per image the shift (dy, dx, 32 px units)
    where its blurred 32 px thumbnail correlates best with `template` (normalised cross-correlation
    over +-REG_RADIUS px, by FFT, parabolic sub-pixel peak), then the same for the second-best peak
    (16 bytes per image). hashes: uint64 (VARIANTS, len(rows)), the pHash of each variant
    (`variant_thumbs`)."""
    out = np.empty((len(rows), 4), dtype=np.float32)
    hashes = np.empty((VARIANTS, len(rows)), dtype=np.uint64)
    # no wrap-around: m + r + REG_WINDOW <= THUMB
    size, r, m = THUMB, REG_RADIUS, (THUMB - REG_WINDOW) // 2
    ft = np.conj(np.fft.rfft2(template, s=(size, size)))
    span = 2 * r + 1
    grid_y, grid_x = np.divmod(np.arange(span * span), span)
    for start in range(0, len(rows), chunk):
        x32 = halve(sigs[rows[start : start + chunk]].astype(np.float32))
        x = blur121(x32)
        n = len(x)
        num = np.fft.irfft2(np.fft.rfft2(x, s=(size, size)) * ft, s=(size, size))[
            :, m - r : m + r + 1, m - r : m + r + 1
        ]
        w = REG_WINDOW
        region = x[:, m - r : m + r + w, m - r : m + r + w]  # every window the search looks at
        # small sums: float32 stays exact enough
        region = region - region.mean(axis=(1, 2), keepdims=True)
        total, squares = window_sums(region, r, w), window_sums(region * region, r, w)
        spread = np.sqrt(np.maximum(squares - total * total / (w * w), 1e-6))
        corr = (num / spread).reshape(n, -1)
        at = np.arange(n)
        first = corr.argmax(axis=1)
        fy, fx = np.divmod(first, span)
        far = (np.abs(grid_y[None] - fy[:, None]) >= SECOND_PEAK_GAP) | (
            np.abs(grid_x[None] - fx[:, None]) >= SECOND_PEAK_GAP
        )
        second = np.where(far, corr, -np.inf).argmax(axis=1)
        corr = corr.reshape(n, span, span)
        for col, k in ((0, first), (2, second)):
            iy, ix = np.divmod(k, span)
            out[start : start + n, col] = iy - r + _parabola(corr, at, iy, ix, axis=0)
            out[start : start + n, col + 1] = ix - r + _parabola(corr, at, iy, ix, axis=1)
        for v in range(VARIANTS):
            hashes[v, start : start + n] = phash_array(_variants(x32, out[start : start + n], v))
    return out, hashes


def variant_thumbs(
    sigs: np.ndarray, rows: np.ndarray, offsets: np.ndarray, variant: np.ndarray
) -> np.ndarray:
    """uint8 (len(rows), 32, 32): image rows[k] resampled as its `variant[k]` from `offsets[k]`
    (`register`)."""
    out = np.empty((len(rows), THUMB, THUMB), dtype=np.uint8)
    for start in range(0, len(rows), 1024):
        sl = slice(start, start + 1024)
        moved = _variants(halve(sigs[rows[sl]].astype(np.float32)), offsets[sl], variant[sl])
        out[sl] = np.clip(np.rint(moved), 0, 255)
    return out


def _variants(x32: np.ndarray, offsets: np.ndarray, variant) -> np.ndarray:
    """Float 32 px thumbnails resampled as `variant` (VARIANTS; one for all, or one per image): the
    central 80 % at the registered shift, the central 72 % there, or the central 80 % at the second
    peak."""
    variant = np.broadcast_to(variant, (len(x32),))
    zoom = np.where(variant == 1, REG_CENTRAL * PROBE_ZOOM, REG_CENTRAL).astype(np.float32)
    dy = np.where(variant == 2, offsets[:, 2], offsets[:, 0]).astype(np.float32)
    dx = np.where(variant == 2, offsets[:, 3], offsets[:, 1]).astype(np.float32)
    return resample(x32, zoom, dy, dx)


def _parabola(
    corr: np.ndarray, rows: np.ndarray, iy: np.ndarray, ix: np.ndarray, axis: int
) -> np.ndarray:
    """Sub-pixel offset of the peak along one axis (0 at the search border)."""
    last = corr.shape[1] - 1
    i = iy if axis == 0 else ix
    inner = (i > 0) & (i < last)
    lo, hi = np.clip(i - 1, 0, last), np.clip(i + 1, 0, last)
    c0 = corr[rows, iy, ix]
    cm = corr[rows, lo, ix] if axis == 0 else corr[rows, iy, lo]
    cp = corr[rows, hi, ix] if axis == 0 else corr[rows, iy, hi]
    den = cm - 2 * c0 + cp
    off = np.divide(0.5 * (cm - cp), den, out=np.zeros_like(den), where=den < -1e-9)
    return np.where(inner, np.clip(off, -0.5, 0.5), 0.0)


def probe_pairs(
    h: np.ndarray, max_bits: int, block_cells: int = 500_000
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) and which hashes matched (0: registered ~ registered, 1 + 2 (v - 1): i's
    probe v ~ j's registered, 2 + 2 (v - 1): i's registered ~ j's probe v), where the registered
    hashes `h[0]` or a probe `h[v]` of one image and the registered hash of the other are within
    `max_bits`. The first matching variant is reported. Row blocks of at most `block_cells`
    comparisons into buffers allocated once: memory stays flat, and no large temporary is allocated
    (and page-faulted) per comparison."""
    n = h.shape[1]
    block = max(1, block_cells // max(1, n))
    xor = np.empty(block * n, dtype=np.uint64)
    best, dist = np.empty(block * n, dtype=np.uint8), np.empty(block * n, dtype=np.uint8)
    found = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        shape = (stop - start, n - start)
        x, b, d = (buf[: shape[0] * shape[1]].reshape(shape) for buf in (xor, best, dist))
        np.bitwise_count(np.bitwise_xor(h[0, start:stop, None], h[0, None, start:], out=x), out=b)
        rows0, cols0 = h[0, start:stop, None], h[0, None, start:]
        for v in range(1, len(h)):
            for rows, cols in ((h[v, start:stop, None], cols0), (rows0, h[v, None, start:])):
                np.bitwise_count(np.bitwise_xor(rows, cols, out=x), out=d)
                np.minimum(b, d, out=b)
        r, c = sparse_nonzero(b <= max_bits)
        keep = c > r  # c counts from `start`: drops self-pairs and pairs already seen
        found.append(np.stack([start + r[keep], start + c[keep]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    i, j = pairs[:, 0], pairs[:, 1]
    dists = [np.bitwise_count(h[0, i] ^ h[0, j])]
    for v in range(1, len(h)):
        dists += [np.bitwise_count(h[v, i] ^ h[0, j]), np.bitwise_count(h[0, i] ^ h[v, j])]
    how = (
        np.argmax(np.stack(dists) <= max_bits, axis=0)
        if len(pairs)
        else np.zeros(0, dtype=np.int64)
    )
    return pairs, how


# grey levels: a uniform margin line varies less than this and matches the outermost line
MARGIN_TOL = 10
MARGIN_MIN = 1  # pixels at 64 px (the border and shift recall on calibration is best at 1)
MARGIN_CAP = 16  # at most a quarter of the size per side


def margins(sigs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int (len(rows), 4): per image the uniform margin (top, bottom, left, right) in pixels of its
    64 px signature: edge lines that are nearly constant and of the outermost line's grey, as a
    padded border or the fill of a shifted copy leave them."""
    out = np.zeros((len(rows), 4), dtype=np.int64)
    c = MARGIN_CAP
    for start in range(0, len(rows), 1024):
        x = sigs[rows[start : start + 1024]]
        cols = x.transpose(0, 2, 1)
        sides = (x[:, :c], x[:, : -c - 1 : -1], cols[:, :c], cols[:, : -c - 1 : -1])
        for side, lines in enumerate(sides):
            # (n, c, size): the c lines nearest the edge, outermost first
            lines = np.ascontiguousarray(lines)
            level = lines.mean(axis=2, dtype=np.float32)
            uniform = (lines.max(axis=2) - lines.min(axis=2) <= MARGIN_TOL) & (
                np.abs(level - level[:, :1]) <= MARGIN_TOL
            )
            out[start : start + len(x), side] = np.argmin(np.pad(uniform, ((0, 0), (0, 1))), axis=1)
    return out


def trim(sigs: np.ndarray, rows: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """float32 (len(rows), 64, 64): each image with its margins (`margins`) cut off and the rest
    stretched back to the full size."""
    n = sigs.shape[1]
    top, bottom, left, right = margin.astype(np.float32).T
    wy = interp_weights(n, (n - 1 - top - bottom) / (n - 1), (top - bottom) / 2)
    wx = interp_weights(n, (n - 1 - left - right) / (n - 1), (left - right) / 2)
    return wy @ sigs[rows].astype(np.float32) @ wx.transpose(0, 2, 1)


def trimmed_hashes(sigs: np.ndarray, rows: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """uint64 pHash of each image trimmed (`trim`): a copy padded with a border then hashes like its
    source (docs/duplicates.md)."""
    out = np.empty(len(rows), dtype=np.uint64)
    for start in range(0, len(rows), 1024):
        sl = slice(start, start + 1024)
        out[sl] = phash_array(halve(trim(sigs, rows[sl], margin[sl])))
    return out
