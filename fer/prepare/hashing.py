"""Near-duplicate signals in plain NumPy: per file a 64x64 grey signature and two perceptual hashes,
and the cheap searches that turn them into candidate pairs.

What counts as a near-duplicate is defined in docs/duplicates.md: the same shot after edits, never
the same person with another expression. Per file (computed once, in the decoding workers):
- `signature`: the image as 64x64 grey uint8 (4 KiB), what pairs are confirmed on;
- `phash` of the signature's 32x32 blurred thumbnail, and of its mirror image, so that a mirrored
  copy is found as a hash neighbour of the original (hash(a) close to hash(mirror(b))).

Candidates: `candidate_pairs` (hash neighbours), then `quick_correlation` (a shift-tolerant
correlation of small thumbnails) as a first filter. Pairs are confirmed by `alignment.compare`;
the thresholds are in duplicates.py, the shift-tolerant hashes in registration.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from fer.prepare.image_ops import halve, window_sums

SIG = 64
THUMB = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT8 = _dct_matrix(THUMB)[:8]  # the 8 lowest frequencies
_BLUR = np.array([0.1, 0.8, 0.1])  # ~ Gaussian sigma 0.5 px at 32 px


def signature(rgb: np.ndarray) -> np.ndarray:
    """uint8 64x64 greyscale of a decoded image (area-averaged when shrinking): 4 KiB per file."""
    img = Image.fromarray(rgb).convert("L")
    return np.asarray(img.resize((SIG, SIG), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


def image_signature(img: Image.Image) -> np.ndarray:
    """`signature` of a decoded greyscale or RGB Pillow image, without the RGB array: the same
    pixels (an L image's RGB copy converts back to exactly its grey levels; test_duplicates checks
    both paths), for less work per file."""
    grey = img if img.mode == "L" else img.convert("L")
    return np.asarray(grey.resize((SIG, SIG), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


def thumbnail(sig: np.ndarray) -> np.ndarray:
    """float 32x32: the signature averaged 2x2 and slightly blurred (the pHash input)."""
    t = sig.astype(np.float64).reshape(THUMB, 2, THUMB, 2).mean(axis=(1, 3))
    p = np.pad(t, 1, mode="edge")
    t = _BLUR[0] * p[:-2, 1:-1] + _BLUR[1] * p[1:-1, 1:-1] + _BLUR[2] * p[2:, 1:-1]
    p = np.pad(t, 1, mode="edge")
    return _BLUR[0] * p[1:-1, :-2] + _BLUR[1] * p[1:-1, 1:-1] + _BLUR[2] * p[1:-1, 2:]


def _pack(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def phash(thumb: np.ndarray) -> int:
    """64-bit DCT hash of a 32x32 thumbnail: its 8x8 lowest frequencies compared to their median."""
    return _bits(_DCT8 @ np.asarray(thumb, dtype=np.float64) @ _DCT8.T)


def _bits(low: np.ndarray) -> int:
    low = low.ravel()
    median = np.partition(low[1:], 31)[31]  # of the 63 AC terms (the DC term is just brightness)
    return _pack(low > median)


# the DCT of a left-right mirrored image: odd columns change sign
_MIRROR_SIGNS = (-1.0) ** np.arange(8)


def phashes(sig: np.ndarray) -> tuple[str, str]:
    """(pHash, pHash of the mirror image) of one signature, as 16 hex digits each."""
    h, hm = batch_phashes(sig[None])
    return h[0], hm[0]


def _blur_matrix(n: int) -> np.ndarray:
    """The `_BLUR` filter with replicated edges as an (n, n) matrix: blur(t) = B @ t @ B.T."""
    m = np.zeros((n, n))
    for i in range(n):
        for k, w in zip((i - 1, i, i + 1), _BLUR):
            m[i, min(max(k, 0), n - 1)] += w
    return m


# blur and the 8 lowest DCT frequencies in one product per axis
_DCT8_BLUR = _DCT8 @ _blur_matrix(THUMB)


def batch_phashes(sigs: np.ndarray, chunk: int = 1024) -> tuple[list[str], list[str]]:
    """pHash and mirror pHash of every signature (n, 64, 64), vectorised (one call per image costs
    far more than the hash itself). The mirror's DCT is the image's with the odd
    horizontal frequencies negated, so one transform serves both; the blur is folded into the DCT
    matrix. Same bits as `phash(thumbnail(sig))` (up to float rounding at exact ties)."""
    out_h, out_m = [], []
    for start in range(0, len(sigs), chunk):
        h, hm = _phash_pair(halve(sigs[start : start + chunk].astype(np.float32)))
        out_h.extend(f"{x:016x}" for x in h.tolist())
        out_m.extend(f"{x:016x}" for x in hm.tolist())
    return out_h, out_m


def _phash_pair(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 pHash and mirror pHash of 32x32 thumbnails (n, 32, 32), blurred here (inside the
    DCT)."""
    low = _DCT8_BLUR @ t.astype(np.float64) @ _DCT8_BLUR.T
    out = []
    for coeffs in (low, low * _MIRROR_SIGNS[None, None, :]):
        flat = coeffs.reshape(len(coeffs), 64)
        median = np.partition(flat[:, 1:], 31, axis=1)[:, 31]
        packed = np.packbits(flat > median[:, None], axis=1)
        out.append(packed.view(">u8").ravel().astype(np.uint64))
    return out[0], out[1]


def phash_array(t: np.ndarray) -> np.ndarray:
    """uint64 pHash of 32x32 thumbnails (n, 32, 32), blurred here."""
    return _phash_pair(t)[0]


def hashes_to_array(hex_hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def candidate_pairs(
    hashes: np.ndarray, mirrored: np.ndarray | None, max_bits: int, block_cells: int = 500_000
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) with hash(i) within `max_bits` of hash(j) or of hash(mirror(j))
    (`mirrored`, or None: plain hashes only), as an (n, 2) array, and per pair whether the mirrored
    match was the closer one.

    Compares every pair in row blocks of at most `block_cells` comparisons, into buffers allocated
    once: memory stays flat, and no large temporary is allocated (and page-faulted) per block.
    """
    n = len(hashes)
    block = max(1, block_cells // max(1, n))
    xor = np.empty(block * n, dtype=np.uint64)
    dist, dist_m = np.empty(block * n, dtype=np.uint8), np.empty(block * n, dtype=np.uint8)
    found = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        shape = (stop - start, n - start)
        x, d, dm = (buf[: shape[0] * shape[1]].reshape(shape) for buf in (xor, dist, dist_m))
        rows = hashes[start:stop, None]
        np.bitwise_count(np.bitwise_xor(rows, hashes[None, start:], out=x), out=d)
        if mirrored is not None:
            np.bitwise_count(np.bitwise_xor(rows, mirrored[None, start:], out=x), out=dm)
            np.minimum(d, dm, out=d)
        r, c = sparse_nonzero(d <= max_bits)
        keep = c > r  # c counts from `start`: drops self-pairs and pairs already seen
        found.append(np.stack([start + r[keep], start + c[keep]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    if mirrored is None or not len(pairs):
        return pairs, np.zeros(len(pairs), dtype=bool)
    i, j = pairs[:, 0], pairs[:, 1]
    return pairs, np.bitwise_count(hashes[i] ^ mirrored[j]) < np.bitwise_count(
        hashes[i] ^ hashes[j]
    )


def sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a 2-D boolean array that is almost all False, faster than np.nonzero: the
    bytes are scanned as 64-bit words first, and only the few non-zero words are looked at byte by
    byte."""
    flat = np.ascontiguousarray(mask).reshape(-1)
    n8 = len(flat) // 8 * 8
    words = np.flatnonzero(flat[:n8].view(np.uint64))
    sub_r, sub_c = np.nonzero(flat[:n8].reshape(-1, 8)[words])
    idx = np.concatenate([words[sub_r] * 8 + sub_c, n8 + np.flatnonzero(flat[n8:])])
    return np.divmod(idx, mask.shape[1])


def quick_correlation(
    thumbs: np.ndarray, pairs: np.ndarray, max_shift: int = 2, block: int = 2048
) -> np.ndarray:
    """Per pair (i, j), the highest correlation between the centre of square thumbnail i (32 px, or
    any size) and any window of thumbnail j (already mirrored where needed) shifted by up to
    `max_shift` pixels: a cheap first filter before `alignment.compare`, which costs far more per
    pair.

    Normalised cross-correlation without re-normalising every window: each image's window norms for
    all shifts come once from a summed-area table, i's centre is normalised once per block of pairs,
    and a shift then costs one dot product. Memory is bounded by `block` pairs, whatever the number
    of pairs.
    """
    out = np.full(len(pairs), -1.0, dtype=np.float32)
    if not len(pairs):
        return out
    size = thumbs.shape[1]
    r, inner = max_shift, size - 2 * max_shift
    used, local = np.unique(pairs, return_inverse=True)
    local = local.reshape(pairs.shape)
    spread = _window_spreads(thumbs, used, r, inner)  # (len(used), shifts)
    shifts = [(y, x) for y in range(2 * r + 1) for x in range(2 * r + 1)]
    for start in range(0, len(pairs), block):
        a, b = local[start : start + block, 0], local[start : start + block, 1]
        centre = thumbs[used[a], r : size - r, r : size - r].astype(np.float32)
        centre -= centre.mean(axis=(1, 2), keepdims=True)
        norm = np.sqrt((centre * centre).sum(axis=(1, 2), keepdims=True))
        # flat: no structure
        centre = np.divide(centre, norm, out=np.zeros_like(centre), where=norm > 1e-3)
        other = thumbs[used[b]].astype(np.float32)
        best = out[start : start + block]
        for k, (y, x) in enumerate(shifts):
            dot = np.einsum("pij,pij->p", centre, other[:, y : y + inner, x : x + inner])
            s = spread[b, k]
            np.maximum(best, np.divide(dot, s, out=np.zeros_like(dot), where=s > 1e-3), out=best)
    return out


def _window_spreads(
    thumbs: np.ndarray, used: np.ndarray, r: int, inner: int, chunk: int = 2048
) -> np.ndarray:
    """sqrt(sum of squared deviations from the mean) of every (2r+1)^2 shifted window of each used
    image."""
    n = inner * inner
    out = np.empty((len(used), (2 * r + 1) ** 2), dtype=np.float32)
    for start in range(0, len(used), chunk):
        t = thumbs[used[start : start + chunk]].astype(np.float32)
        t -= t.mean(axis=(1, 2), keepdims=True)
        total, squares = window_sums(t, r, inner), window_sums(t * t, r, inner)
        out[start : start + len(t)] = np.sqrt(np.maximum(squares - total * total / n, 0.0)).reshape(
            len(t), -1
        )
    return out
