"""The aligned check that confirms a near-duplicate candidate pair (definition: docs/duplicates.md).

`compare` aligns b to a (mirror, zoom 0.87-1.14, shifts up to ~12 %: a coarse search at 16 px,
refined at 32 px, then to half a pixel), then scores the pair on the central 52x52 pixels (borders
and the gap a shift leaves are outside it) by their global correlation and by the largest local
difference: the residual after alignment, smoothed, measured in 16x16 windows. Edits change every
window a little; another expression of the same face changes the mouth, eye or brow windows a lot.
Most candidates are no copies: a blurred 32 px correlation after the coarse search rejects them
before the sub-pixel stage (`EARLY_REJECT`), and the local difference is only computed where the
correlation passes. The thresholds that decide are in duplicates.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fer.prepare.hashing import SIG, THUMB
from fer.prepare.image_ops import (
    blur121,
    halve,
    interp_weights,
    normalise,
    resample,
    window_sums,
)

MARGIN = 6  # scored region: SIG - 2 * MARGIN pixels (about 10 % off each side)
ZOOMS = (0.87, 0.93, 1.0, 1.07, 1.14)
# blurred 32 px correlation after the coarse search; below it: no copy
EARLY_REJECT = 0.88
# 32 px correlation after the whole-pixel refinement: pairs below it skip the half-pixel stage
# (docs/duplicates.md)
STEP_REJECT = 0.86


@dataclass(frozen=True)
class _Pose:
    """Where b sits on a, per pair: zoom and shift (ty, tx in 64 px units). The arrays are refined
    in place."""

    zoom: np.ndarray
    ty: np.ndarray
    tx: np.ndarray

    def take(self, idx: np.ndarray) -> _Pose:
        return _Pose(self.zoom[idx], self.ty[idx], self.tx[idx])

    def shift(self) -> np.ndarray:
        """The larger axis of the shift, in pixels at 64 px."""
        return np.maximum(np.abs(self.ty), np.abs(self.tx))


def compare(
    sigs: np.ndarray,
    pairs: np.ndarray,
    mirror: np.ndarray | None = None,
    block: int = 256,
    min_corr: float | None = None,
) -> dict[str, np.ndarray]:
    """Align and score each pair (i, j) of 64x64 signatures. Returns per pair: `corr` (global
    correlation of the aligned central regions), `local` (largest RMS of the smoothed residual in a
    16x16 window, in units of the image's contrast), `mirror`, `zoom`, `shift` (pixels at 64 px, the
    larger axis).

    `mirror`: per pair whether to compare with j mirrored; None tries both (twice the work)."""
    n = len(pairs)
    out = {k: np.zeros(n, dtype=np.float32) for k in ("corr", "local", "zoom", "shift")}
    out["mirror"] = np.zeros(n, dtype=bool)
    if mirror is None:
        plain = compare(sigs, pairs, np.zeros(n, dtype=bool), block, min_corr)
        flipped = compare(sigs, pairs, np.ones(n, dtype=bool), block, min_corr)
        use = flipped["corr"] > plain["corr"]
        return {k: np.where(use, flipped[k], plain[k]) for k in plain}
    for start in range(0, n, block):
        sl = slice(start, start + block)
        res = _compare_block(sigs[pairs[sl, 0]], sigs[pairs[sl, 1]], mirror[sl], min_corr)
        for k, v in res.items():
            out[k][sl] = v
    return out


def _compare_block(
    a8: np.ndarray, b8: np.ndarray, mirror: np.ndarray, min_corr: float | None
) -> dict[str, np.ndarray]:
    """Align b to a (coarse search, then sub-pixel) and score. Pairs whose blurred 32 px correlation
    after the coarse search (on the scored region) is below EARLY_REJECT skip the sub-pixel stage
    and the local difference (their `local` is 1.0): blurring makes that correlation nearly
    insensitive to the coarse stage's half-pixel error (unblurred, on a wider region, it was no safe
    bound). With `min_corr`, the local difference is computed only where the final correlation
    reaches it."""
    a = a8.astype(np.float32)
    b = b8.astype(np.float32)
    b[mirror] = b[mirror][:, :, ::-1]
    a32, b32 = halve(a), halve(b)
    pose = _align32(a32, b32)
    early = _blurred_correlation(a32, b32, pose)
    out = {
        "corr": early.astype(np.float32),
        "local": np.ones(len(a), dtype=np.float32),
        "zoom": pose.zoom,
        "shift": pose.shift(),
        "mirror": mirror.copy(),
    }
    go = np.flatnonzero(early >= EARLY_REJECT)
    if len(go):
        res = _refine_and_score(a[go], b[go], a32[go], b32[go], pose.take(go), min_corr)
        for k, v in res.items():
            out[k][go] = v
    return out


def _blurred_correlation(a32: np.ndarray, b32: np.ndarray, pose: _Pose) -> np.ndarray:
    """Correlation of the blurred 32 px scored regions, b placed by the coarse `pose`."""
    m2 = MARGIN // 2
    inside = (slice(None), slice(m2, THUMB - m2), slice(m2, THUMB - m2))
    placed = resample(b32, pose.zoom, pose.ty / 2, pose.tx / 2)
    return (normalise(blur121(a32)[inside]) * normalise(blur121(placed)[inside])).mean(axis=(1, 2))


def _align32(a32: np.ndarray, b32: np.ndarray) -> _Pose:
    """Coarse alignment of b to a (32 px thumbnails): every zoom and shifts up to 12 % at 16 px,
    then zoom +-0.03 and shifts +-2 px at 32 px around that estimate."""
    p = len(a32)
    a16, b16 = halve(a32), halve(b32)
    # coarse: every zoom, shifts up to 2 px at 16 px (12 %)
    best = np.full(p, -2.0, dtype=np.float32)
    zoom = np.ones(p, dtype=np.float32)
    ty, tx = np.zeros(p, dtype=np.float32), np.zeros(p, dtype=np.float32)
    zero = np.zeros(p, dtype=np.float32)
    a16c = normalise(a16[:, 2:-2, 2:-2])
    for z in ZOOMS:
        bz = resample(b16, np.full(p, z, dtype=np.float32), zero, zero)
        s, dy, dx = _shift_search(a16c, bz, 2)
        better = s > best
        best[better], zoom[better] = s[better], z
        ty[better], tx[better] = dy[better] * 4.0, dx[better] * 4.0
    # refine at 32 px: zoom +-0.03 and shifts +-2 px at 32 around the coarse estimate
    best = np.full(p, -2.0, dtype=np.float32)
    z0, ty0, tx0 = zoom.copy(), ty.copy(), tx.copy()
    a32c = normalise(a32[:, 2:-2, 2:-2])
    for dz in (-0.03, 0.0, 0.03):
        bz = resample(b32, z0 + dz, ty0 / 2, tx0 / 2)
        s, dy, dx = _shift_search(a32c, bz, 2)
        better = s > best
        best[better], zoom[better] = s[better], z0[better] + dz
        ty[better], tx[better] = ty0[better] + dy[better] * 2.0, tx0[better] + dx[better] * 2.0
    return _Pose(zoom, ty, tx)


def _refine_and_score(a, b, a32, b32, pose: _Pose, min_corr: float | None) -> dict:
    """Sub-pixel alignment at 32 px from the coarse `pose`, then the scores at 64 px."""
    corr32, go = _refine_subpixel(a32, b32, pose, reject_early=min_corr is not None)
    p = len(a)
    if len(go) == p:
        return _score64(a, b, pose, min_corr)
    # the rejected pairs keep their 32 px correlation (below STEP_REJECT) and no local score
    out = {"corr": corr32, "local": np.ones(p, dtype=np.float32), "zoom": pose.zoom}
    out["shift"] = pose.shift()
    if len(go):
        res = _score64(a[go], b[go], pose.take(go), min_corr)
        for k, v in res.items():
            out[k][go] = v
    return out


def _refine_subpixel(
    a32: np.ndarray, b32: np.ndarray, pose: _Pose, reject_early: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Refine `pose` in place on a 3x3 grid of shifts at 32 px (64 px units: +-1, then +-0.5 with
    zoom +-0.015); returns (the best 32 px correlation, the pairs refined to the end). With
    `reject_early`, pairs below STEP_REJECT after whole pixels stop there.

    A full grid, not a parabola fitted through fewer points: the local-difference limit was
    calibrated on this grid's alignment, and the parabola aligns another expression of the same
    face well enough to pass it (docs/duplicates.md). Each grid row is resampled vertically once and
    then horizontally per column (separable), on the scored region only."""
    p = len(a32)
    m2 = MARGIN // 2
    a32c = normalise(a32[:, m2 : THUMB - m2, m2 : THUMB - m2])
    best_corr = np.full(p, -2.0, dtype=np.float32)
    go = np.arange(p)
    for step, dzs in ((1.0, (0.0,)), (0.5, (-0.015, 0.0, 0.015))):
        if step < 1.0 and reject_early:  # pairs far below after whole pixels: no copy
            go = np.flatnonzero(best_corr >= STEP_REJECT)
        z0, ty0, tx0 = pose.zoom[go], pose.ty[go], pose.tx[go]
        bg, ag = b32[go], a32c[go]
        for dz in dzs:
            wxs = [
                interp_weights(THUMB, z0 + dz, (tx0 + d) / 2, m2, transposed=True)
                for d in (-step, 0.0, step)
            ]
            for ddy in (-step, 0.0, step):
                rows = interp_weights(THUMB, z0 + dz, (ty0 + ddy) / 2, m2) @ bg
                for ddx, wx in zip((-step, 0.0, step), wxs):
                    corr = (ag * normalise(rows @ wx)).mean(axis=(1, 2))
                    better = corr > best_corr[go]
                    idx = go[better]
                    best_corr[idx] = corr[better]
                    pose.zoom[idx], pose.ty[idx], pose.tx[idx] = (
                        z0[better] + dz,
                        ty0[better] + ddy,
                        tx0[better] + ddx,
                    )
    return best_corr, go


def _score64(a, b, pose: _Pose, min_corr: float | None) -> dict:
    """Correlation and local difference at 64 px of b aligned to a."""
    p = len(a)
    m = MARGIN
    ac = normalise(a[:, m : SIG - m, m : SIG - m])
    best_b = normalise(resample(b, pose.zoom, pose.ty, pose.tx, m))
    best_corr = (ac * best_b).mean(axis=(1, 2))
    local = np.ones(p, dtype=np.float32)
    go = np.arange(p) if min_corr is None else np.flatnonzero(best_corr >= min_corr)
    if len(go):
        local[go] = local_difference(ac[go], best_b[go])
    return {"corr": best_corr, "local": local, "zoom": pose.zoom, "shift": pose.shift()}


def _shift_search(ac: np.ndarray, b: np.ndarray, r: int):
    """Best normalised correlation of a's centre (margin r; `ac`: `normalise`d, computed once per
    batch for all the zooms searched) with b's windows shifted by up to r pixels. Returns (corr, dy,
    dx). a's centre has zero mean, so each window only needs its spread (`window_sums`)."""
    p, inner = ac.shape[0], ac.shape[1]
    # same correlations; small sums keep float32 exact enough
    b = b - b.mean(axis=(1, 2), keepdims=True)
    count = inner * inner
    total, squares = window_sums(b, r, inner), window_sums(b * b, r, inner)
    spread = np.sqrt(np.maximum(squares / count - (total / count) ** 2, 0.0))
    best = np.full(p, -2.0, dtype=np.float32)
    by, bx = np.zeros(p, dtype=np.int64), np.zeros(p, dtype=np.int64)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            y, x = r + dy, r + dx
            dot = np.einsum("pij,pij->p", ac, b[:, y : y + inner, x : x + inner]) / count
            sd = spread[:, y, x]
            s = np.divide(dot, sd, out=np.zeros_like(dot), where=sd > 1e-3)
            better = s > best
            best[better], by[better], bx[better] = s[better], dy, dx
    return best, by, bx


def local_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Largest median, over 16x16 windows (stride 8), of the smoothed absolute difference of two
    aligned images after a rank transform. Ranks make any brightness, contrast or gamma change
    vanish; the 5x5 smoothing averages out JPEG noise and resampling; the median ignores thin
    watermark strokes that cover part of a window, while a changed mouth, eye or brow fills it
    (why these choices: docs/duplicates.md)."""
    d = np.abs(_smooth(_rank(a) - _rank(b), 5))
    n, size, stride = d.shape[1], 16, 8
    worst = np.zeros(len(d), dtype=np.float32)
    for y in range(0, n - size + 1, stride):
        for x in range(0, n - size + 1, stride):
            w = d[:, y : y + size, x : x + size].reshape(len(d), -1)
            np.maximum(worst, np.median(w, axis=1), out=worst)
    return worst


def _smooth(x: np.ndarray, k: int = 5) -> np.ndarray:
    """Box blur k x k (valid part) via cumulative sums: JPEG noise, resampling and thin strokes
    average out."""
    c = np.cumsum(np.cumsum(np.pad(x, ((0, 0), (1, 0), (1, 0))), axis=1), axis=2)
    return (c[:, k:, k:] - c[:, :-k, k:] - c[:, k:, :-k] + c[:, :-k, :-k]) / (k * k)


def _rank(x: np.ndarray) -> np.ndarray:
    """Rank transform of each image, normalised. Values are quantised to 16 bits first so that a
    stable radix sort can rank them (cheaper than sorting floats; only values closer than 1/65535
    of the image's range can swap order)."""
    p = x.shape[0]
    flat = x.reshape(p, -1)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    q = ((flat - lo) * (65535.0 / np.maximum(hi - lo, 1e-6))).astype(np.uint16)
    ranks = np.empty(flat.shape, dtype=np.float32)
    ranks[np.arange(p)[:, None], np.argsort(q, axis=1, kind="stable")] = np.arange(
        flat.shape[1], dtype=np.float32
    )
    return normalise(ranks.reshape(x.shape))
