"""Near-duplicate signals in plain NumPy: per file a 64x64 grey signature and two perceptual hashes.

What counts as a near-duplicate is defined in docs/duplicates.md: the same shot after edits, never the same
person with another expression. Per file (computed once, in the decoding workers):
- `signature`: the image as 64x64 grey uint8 (4 KiB), what pairs are confirmed on;
- `phash` of the signature's 32x32 blurred thumbnail, and of its mirror image, so that a mirrored copy is
  found as a hash neighbour of the original (hash(a) close to hash(mirror(b))).

Pairs are confirmed by `compare`: b is aligned to a (mirror, zoom 0.87-1.14, shifts up to ~12 %: coarse
search at 16 px, refined at 32 and 64 px), then scored on the central 52x52 pixels (borders and the gap a
shift leaves are outside it) by their global correlation and by the largest local difference: the residual
after alignment, smoothed, measured in 16x16 windows. Edits change every window a little; another
expression of the same face changes the mouth, eye or brow windows a lot. Thresholds: duplicates.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIG = 64
THUMB = 32
MARGIN = 6  # scored region: SIG - 2 * MARGIN pixels (about 10 % off each side)
ZOOMS = (0.87, 0.93, 1.0, 1.07, 1.14)


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


def thumbnail(sig: np.ndarray) -> np.ndarray:
    """float 32x32: the signature averaged 2x2 and slightly blurred (the pHash input)."""
    t = sig.astype(np.float64).reshape(THUMB, 2, THUMB, 2).mean(axis=(1, 3))
    t = np.apply_along_axis(lambda r: np.convolve(np.pad(r, 1, mode="edge"), _BLUR, "valid"), 0, t)
    return np.apply_along_axis(lambda r: np.convolve(np.pad(r, 1, mode="edge"), _BLUR, "valid"), 1, t)


def _pack(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def phash(thumb: np.ndarray) -> int:
    """64-bit DCT hash of a 32x32 thumbnail: its 8x8 lowest frequencies compared to their median."""
    low = (_DCT8 @ np.asarray(thumb, dtype=np.float64) @ _DCT8.T).ravel()
    median = np.partition(low[1:], 31)[31]  # of the 63 AC terms (the DC term is just brightness)
    return _pack(low > median)


def phashes(sig: np.ndarray) -> tuple[str, str]:
    """(pHash, pHash of the mirror image) as 16 hex digits each."""
    t = thumbnail(sig)
    return f"{phash(t):016x}", f"{phash(t[:, ::-1]):016x}"


def hashes_to_array(hex_hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def candidate_pairs(hashes: np.ndarray, mirrored: np.ndarray, max_bits: int,
                    block_cells: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) with hash(i) within `max_bits` of hash(j) or of hash(mirror(j)), as an (n, 2)
    array, and per pair whether the mirrored match was the closer one.

    Compares every pair in row blocks of at most `block_cells` comparisons, so memory stays flat.
    """
    n = len(hashes)
    block = max(1, block_cells // max(1, n))
    found, flips = [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        rows = hashes[start:stop, None]
        dist = np.bitwise_count(rows ^ hashes[None, start:])
        dist_m = np.bitwise_count(rows ^ mirrored[None, start:])
        r, c = np.nonzero(np.minimum(dist, dist_m) <= max_bits)
        keep = c > r  # c counts from `start`: drops self-pairs and pairs already seen
        r, c = r[keep], c[keep]
        found.append(np.stack([start + r, start + c], axis=1))
        flips.append(dist_m[r, c] < dist[r, c])
    if not found:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(found), np.concatenate(flips)


# --- confirmation -----------------------------------------------------------------------------------------

def _resample(img: np.ndarray, zoom: np.ndarray, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
    """Bilinear b(c + (p - c) * zoom + t) for a batch (P, N, N), per-image zoom and shift (pixels)."""
    p, n = img.shape[0], img.shape[1]
    c = (n - 1) / 2.0
    grid = np.arange(n, dtype=np.float32) - c
    ys = c + grid[None, :] * zoom[:, None] + ty[:, None]
    xs = c + grid[None, :] * zoom[:, None] + tx[:, None]
    ys, xs = np.clip(ys, 0, n - 1), np.clip(xs, 0, n - 1)
    y0 = np.minimum(ys.astype(np.int64), n - 2)
    x0 = np.minimum(xs.astype(np.int64), n - 2)
    wy, wx = (ys - y0)[:, :, None], (xs - x0)[:, None, :]
    idx = np.arange(p)[:, None, None]
    rows0 = img[idx, y0[:, :, None], np.arange(n)[None, None, :]]  # (P, N, N) rows y0
    rows1 = img[idx, y0[:, :, None] + 1, np.arange(n)[None, None, :]]
    rows = rows0 * (1 - wy) + rows1 * wy
    cols0 = np.take_along_axis(rows, np.broadcast_to(x0[:, None, :], rows.shape), axis=2)
    cols1 = np.take_along_axis(rows, np.broadcast_to(x0[:, None, :] + 1, rows.shape), axis=2)
    return cols0 * (1 - wx) + cols1 * wx


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=(1, 2), keepdims=True)
    norm = np.sqrt((x * x).mean(axis=(1, 2), keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-3)


def _shift_search(a: np.ndarray, b: np.ndarray, r: int):
    """Best normalised correlation of a's centre (margin r) with b's windows shifted by up to r pixels.
    Returns (corr, dy, dx)."""
    p, n = a.shape[0], a.shape[1]
    inner = n - 2 * r
    ac = _normalise(a[:, r:n - r, r:n - r])
    best = np.full(p, -2.0, dtype=np.float32)
    by, bx = np.zeros(p, dtype=np.int64), np.zeros(p, dtype=np.int64)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            win = _normalise(b[:, r + dy:r + dy + inner, r + dx:r + dx + inner])
            s = (ac * win).mean(axis=(1, 2))
            better = s > best
            best[better], by[better], bx[better] = s[better], dy, dx
    return best, by, bx


def _smooth(x: np.ndarray, k: int = 5) -> np.ndarray:
    """Box blur k x k (valid part) via cumulative sums: JPEG noise, resampling and thin strokes average out."""
    c = np.cumsum(np.cumsum(np.pad(x, ((0, 0), (1, 0), (1, 0))), axis=1), axis=2)
    return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / (k * k)


def compare(sigs: np.ndarray, pairs: np.ndarray, mirror: np.ndarray | None = None, block: int = 1024
            ) -> dict[str, np.ndarray]:
    """Align and score each pair (i, j) of 64x64 signatures. Returns per pair: `corr` (global correlation
    of the aligned central regions), `local` (largest RMS of the smoothed residual in a 16x16 window, in
    units of the image's contrast), `mirror`, `zoom`, `shift` (pixels at 64 px, the larger axis).

    `mirror`: per pair whether to compare with j mirrored; None tries both (twice the work)."""
    n = len(pairs)
    out = {k: np.zeros(n, dtype=np.float32) for k in ("corr", "local", "zoom", "shift")}
    out["mirror"] = np.zeros(n, dtype=bool)
    if mirror is None:
        plain = compare(sigs, pairs, np.zeros(n, dtype=bool), block)
        flipped = compare(sigs, pairs, np.ones(n, dtype=bool), block)
        use = flipped["corr"] > plain["corr"]
        return {k: np.where(use, flipped[k], plain[k]) for k in plain}
    for start in range(0, n, block):
        sl = slice(start, start + block)
        res = _compare_block(sigs[pairs[sl, 0]], sigs[pairs[sl, 1]], mirror[sl])
        for k, v in res.items():
            out[k][sl] = v
    return out


def _compare_block(a8: np.ndarray, b8: np.ndarray, mirror: np.ndarray) -> dict[str, np.ndarray]:
    a = a8.astype(np.float32)
    b = b8.astype(np.float32)
    b[mirror] = b[mirror][:, :, ::-1]
    p = len(a)
    a16 = a.reshape(p, 16, 4, 16, 4).mean(axis=(2, 4))
    b16 = b.reshape(p, 16, 4, 16, 4).mean(axis=(2, 4))
    # coarse: every zoom, shifts up to 2 px at 16 px (12 %)
    best = np.full(p, -2.0, dtype=np.float32)
    zoom = np.ones(p, dtype=np.float32)
    ty, tx = np.zeros(p, dtype=np.float32), np.zeros(p, dtype=np.float32)
    zero = np.zeros(p, dtype=np.float32)
    for z in ZOOMS:
        bz = _resample(b16, np.full(p, z, dtype=np.float32), zero, zero)
        s, dy, dx = _shift_search(a16, bz, 2)
        better = s > best
        best[better], zoom[better] = s[better], z
        ty[better], tx[better] = dy[better] * 4.0, dx[better] * 4.0
    # refine at 32 px: the coarse shift applied, then +-2 px at 32 (+-4 px at 64)
    a32 = a.reshape(p, 32, 2, 32, 2).mean(axis=(2, 4))
    b32 = b.reshape(p, 32, 2, 32, 2).mean(axis=(2, 4))
    bz = _resample(b32, zoom, ty / 2, tx / 2)
    _, dy, dx = _shift_search(a32, bz, 2)
    ty, tx = ty + dy * 2.0, tx + dx * 2.0
    # refine at 64 px: +-1 px by correlation, then the local check at the best offset
    m = MARGIN
    ac = _normalise(a[:, m:SIG - m, m:SIG - m])
    best_corr = np.full(p, -2.0, dtype=np.float32)
    best_b = np.zeros_like(ac)
    final_ty, final_tx = ty.copy(), tx.copy()
    for ddy in (-1.0, 0.0, 1.0):
        for ddx in (-1.0, 0.0, 1.0):
            bz = _normalise(_resample(b, zoom, ty + ddy, tx + ddx)[:, m:SIG - m, m:SIG - m])
            corr = (ac * bz).mean(axis=(1, 2))
            better = corr > best_corr
            best_corr[better], best_b[better] = corr[better], bz[better]
            final_ty[better], final_tx[better] = ty[better] + ddy, tx[better] + ddx
    local = _window_rms(_smooth(ac - best_b), 16, 8)
    return {"corr": best_corr, "local": local, "zoom": zoom,
            "shift": np.maximum(np.abs(final_ty), np.abs(final_tx)), "mirror": mirror.copy()}


def _window_rms(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Largest root-mean-square over size x size windows placed every `stride` pixels."""
    n = x.shape[1]
    worst = np.zeros(len(x), dtype=np.float32)
    for y in range(0, n - size + 1, stride):
        for xx in range(0, n - size + 1, stride):
            w = x[:, y:y + size, xx:xx + size]
            np.maximum(worst, np.sqrt((w * w).mean(axis=(1, 2))), out=worst)
    return worst
