"""Batched NumPy operations on small grey images, shared by the hashes (hashing.py), the aligned
check (alignment.py) and the registration (registration.py).

Every function takes a batch (n, h, w) of images. The order of the float operations is deliberate:
the duplicate decisions depend on these exact values, so a rewrite must keep them bit for bit.
"""

from __future__ import annotations

import numpy as np


def halve(x: np.ndarray) -> np.ndarray:
    """2x2 mean of a batch (n, 2h, 2w) of float images, as strided sums (no reshaped copy)."""
    out = np.add(x[:, ::2, ::2], x[:, 1::2, ::2])
    out += x[:, ::2, 1::2]  # in place, in the same order (the same float values, fewer temporaries)
    out += x[:, 1::2, 1::2]
    out *= 0.25
    return out


def blur121(t: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 in both directions, edges replicated (float)."""
    p = np.pad(t, ((0, 0), (1, 1), (0, 0)), mode="edge")
    t = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    p = np.pad(t, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return 0.25 * p[:, :, :-2] + 0.5 * p[:, :, 1:-1] + 0.25 * p[:, :, 2:]


def normalise(x: np.ndarray) -> np.ndarray:
    """Each image at zero mean and unit RMS (a flat image stays zeros): correlations become means of
    products."""
    x = x - x.mean(axis=(1, 2), keepdims=True)
    norm = np.sqrt((x * x).mean(axis=(1, 2), keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-3)


def resample(
    img: np.ndarray, zoom: np.ndarray, ty: np.ndarray, tx: np.ndarray, crop: int = 0
) -> np.ndarray:
    """Bilinear b(c + (p - c) * zoom + t) for a batch (P, N, N), per-image zoom and shift (pixels),
    edges clamped; only the output pixels crop..N-crop of each axis. Separable, as two batched
    matrix products (much cheaper than gathering four neighbours per pixel)."""
    n = img.shape[1]
    return (
        interp_weights(n, zoom, ty, crop) @ img @ interp_weights(n, zoom, tx, crop, transposed=True)
    )


def interp_weights(
    n: int, zoom: np.ndarray, t: np.ndarray, crop: int = 0, transposed: bool = False
) -> np.ndarray:
    """(P, n - 2 crop, n) matrices: row o holds the bilinear weights of output pixel crop + o on the
    input pixels; `transposed`: (P, n, n - 2 crop), contiguous (what the right-hand product needs,
    without a copy)."""
    c = (n - 1) / 2.0
    out = np.arange(crop, n - crop, dtype=np.float32)
    pos = np.clip(c + (out - c)[None, :] * zoom[:, None] + t[:, None], 0, n - 1)
    i0 = np.minimum(pos.astype(np.int64), n - 2)
    w = (pos - i0).astype(np.float32)
    p, o = len(zoom), len(out)
    # filled through flat indices (cheaper than 3 index arrays)
    weights = np.zeros(p * o * n, dtype=np.float32)
    if transposed:  # element (k, i, o) at (k * n + i) * o_count + o
        at = (np.arange(p)[:, None] * n + i0) * o + np.arange(o)[None, :]
        weights[at], weights[at + o] = 1 - w, w
        return weights.reshape(p, n, o)
    at = (np.arange(p)[:, None] * o + np.arange(o)[None, :]) * n + i0
    weights[at], weights[at + 1] = 1 - w, w
    return weights.reshape(p, o, n)


def window_sums(x: np.ndarray, r: int, inner: int) -> np.ndarray:
    """(p, 2r+1, 2r+1): the sum of every inner x inner window of each image at offsets 0..2r per
    axis, as two box sums (first along the columns, then along the rows of the 2r+1 results)."""
    m = inner + 2 * r  # the windows cover no more than this
    rows = offset_sums(x[:, :m, :m], 2 * r + 1)  # (p, m, k)
    return offset_sums(np.ascontiguousarray(rows.transpose(0, 2, 1)), 2 * r + 1).transpose(0, 2, 1)


def offset_sums(x: np.ndarray, k: int) -> np.ndarray:
    """(p, a, k): along the last axis (length n), the sums of the n - k + 1 long windows starting at
    0..k-1: the whole line minus its first o and its last k - 1 - o values (cheaper at 32 px than a
    cumulative sum over the whole line)."""
    total = x.sum(axis=2, keepdims=True, dtype=np.float32)
    head = np.zeros(x.shape[:2] + (k,), dtype=np.float32)  # head[o]: the first o values
    tail = np.zeros_like(head)  # tail[s]: the last s values
    head[:, :, 1], tail[:, :, 1] = x[:, :, 0], x[:, :, -1]
    # running sums in a cumsum's order: the same float32 values, cheaper on short lines
    for o in range(2, k):
        np.add(head[:, :, o - 1], x[:, :, o - 1], out=head[:, :, o])
        np.add(tail[:, :, o - 1], x[:, :, -o], out=tail[:, :, o])
    return total - head - tail[:, :, ::-1]
