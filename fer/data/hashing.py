"""Near-duplicate detection in plain NumPy: a perceptual hash to find candidates, a thumbnail to confirm.

pHash (the 8x8 lowest DCT frequencies of a 32x32 greyscale image, compared to their median) changes little
when an image is re-encoded, resized or re-lit, so copies land within a few of its 64 bits. But faces are
aligned and alike, so on FER2013 distinct photos also come within 10-12 bits. Candidates (pHash within
`max_bits`) are therefore confirmed by the correlation of normalised 32x32 greyscale thumbnails, maximised
over shifts of up to 2 pixels (6 %) so slightly shifted or re-cropped copies still match.

Calibration: on FER2013 pairs above 0.90 are copies of one photo (re-cropped, watermarked, re-encoded;
at 0.94, 32 of 32 random near clusters of the full set were copies when checked by eye); on the demo
faces copies score >= 0.948 while distinct photos of one person in one expression stay <= 0.932. Hence
0.94 (duplicates.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


THUMB = 32
_DCT8 = _dct_matrix(THUMB)[:8]  # the 8 lowest frequencies
MAX_SHIFT = 2


def _pack(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """uint8 32x32 greyscale, slightly blurred: the input of pHash and the confirmation signature (1 KB).

    The blur (sigma 0.7 px) makes sub-pixel shifts of thin features (eyes, mouth lines) cost little.
    """
    small = Image.fromarray(rgb).convert("L").resize((THUMB, THUMB), Image.BILINEAR)
    return np.asarray(small.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.uint8)


def phash(thumb: np.ndarray) -> int:
    """64-bit DCT hash of a 32x32 thumbnail: its 8x8 lowest frequencies compared to their median."""
    low = (_DCT8 @ thumb.astype(np.float64) @ _DCT8.T).ravel()
    median = np.partition(low[1:], 31)[31]  # of the 63 AC terms (the DC term is just brightness)
    return _pack(low > median)


def hashes_to_array(hex_hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def candidate_pairs(hashes: np.ndarray, max_bits: int, block_cells: int = 2_000_000) -> np.ndarray:
    """All index pairs (i < j) whose 64-bit hashes differ in at most `max_bits` bits, as an (n, 2) array.

    Compares every pair in row blocks of at most `block_cells` comparisons (16 MB of XORs), so memory stays
    flat; 29k images are ~0.4 G comparisons, a few seconds.
    """
    n = len(hashes)
    block = max(1, block_cells // max(1, n))
    found = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        dist = np.bitwise_count(hashes[start:stop, None] ^ hashes[None, start:])
        rows, cols = np.nonzero(dist <= max_bits)
        keep = cols > rows  # cols count from `start`: drops self-pairs and pairs already seen
        found.append(np.stack([start + rows[keep], start + cols[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def shift_correlation(thumbs: np.ndarray, pairs: np.ndarray, max_shift: int = MAX_SHIFT,
                      block: int = 4096) -> np.ndarray:
    """Per pair (i, j), the highest correlation between the centre of thumbnail i and any window of
    thumbnail j shifted by up to `max_shift` pixels.

    Normalised cross-correlation without re-normalising every window: each image's window norms for all
    shifts come once from a summed-area table, i's centre is normalised once per block of pairs, and a
    shift then costs one dot product. Memory is bounded by `block` pairs, whatever the number of pairs.
    """
    out = np.full(len(pairs), -1.0, dtype=np.float32)
    if not len(pairs):
        return out
    r, inner = max_shift, THUMB - 2 * max_shift
    used, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(pairs.shape)
    spread = _window_spreads(thumbs, used, r, inner)  # (len(used), shifts)
    shifts = [(y, x) for y in range(2 * r + 1) for x in range(2 * r + 1)]
    for start in range(0, len(pairs), block):
        a, b = local[start:start + block, 0], local[start:start + block, 1]
        centre = thumbs[used[a], r:THUMB - r, r:THUMB - r].astype(np.float32)
        centre -= centre.mean(axis=(1, 2), keepdims=True)
        norm = np.sqrt((centre * centre).sum(axis=(1, 2), keepdims=True))
        centre = np.divide(centre, norm, out=np.zeros_like(centre), where=norm > 1e-3)  # flat: no structure
        other = thumbs[used[b]].astype(np.float32)
        best = out[start:start + block]
        for k, (y, x) in enumerate(shifts):
            dot = np.einsum("pij,pij->p", centre, other[:, y:y + inner, x:x + inner])
            s = spread[b, k]
            np.maximum(best, np.divide(dot, s, out=np.zeros_like(dot), where=s > 1e-3), out=best)
    return out


def _window_spreads(thumbs: np.ndarray, used: np.ndarray, r: int, inner: int, chunk: int = 2048) -> np.ndarray:
    """sqrt(sum of squared deviations from the mean) of every (2r+1)^2 shifted window of each used image."""
    n = inner * inner
    out = np.empty((len(used), (2 * r + 1) ** 2), dtype=np.float32)
    for start in range(0, len(used), chunk):
        t = thumbs[used[start:start + chunk]].astype(np.float64)
        sat = np.zeros((len(t), THUMB + 1, THUMB + 1))
        sat[:, 1:, 1:] = t.cumsum(1).cumsum(2)
        sat2 = np.zeros_like(sat)
        sat2[:, 1:, 1:] = (t * t).cumsum(1).cumsum(2)
        k = 0
        for y in range(2 * r + 1):
            for x in range(2 * r + 1):
                total, squares = _window_sum(sat, y, x, inner), _window_sum(sat2, y, x, inner)
                out[start:start + len(t), k] = np.sqrt(np.maximum(squares - total * total / n, 0.0))
                k += 1
    return out


def _window_sum(sat: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """Sum of every image's window [y:y+size, x:x+size] from its summed-area table."""
    return sat[:, y + size, x + size] - sat[:, y, x + size] - sat[:, y + size, x] + sat[:, y, x]
