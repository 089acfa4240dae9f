"""Paired comparison of two classifiers on the same test images: is the accuracy difference real?

Two models tested on the same images make correlated errors, so comparing their two separate
accuracy intervals is too conservative (and overlapping intervals say little). The paired view uses,
per image, whether each model was right:

- paired bootstrap: resample images with replacement, recompute the accuracy difference (A - B) on
  each resample; the 2.5th and 97.5th percentiles give its 95% interval;
- McNemar's exact test: only the discordant images carry information (A right and B wrong: b; A
  wrong and B right: c); under "equally accurate" b ~ Binomial(b + c, 1/2). The two-sided exact
  p-value is the binomial test's (identical to `scipy.stats.binomtest(b, b + c, 0.5).pvalue`,
  checked in tests/test_compare.py), computed here with exact integer arithmetic so fer/ needs no
  scipy.

Plain NumPy, no Keras, no Ray.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for `b` and `c` discordant pairs (1.0 when there are
    none)."""
    b, c = int(b), int(c)
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # P(X <= k) * 2**n, exactly
    return float(min(1.0, 2 * tail / 2**n))


def paired_bootstrap(
    correct_a, correct_b, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(accuracy of A - accuracy of B, 2.5th percentile, 97.5th percentile) over image resamples."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(
            f"paired_bootstrap needs two equal, non-empty 1-D arrays, got {a.shape} and {b.shape}"
        )
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 200):  # chunks bound the memory on large test splits
        size = min(200, n_boot - start)
        means[start : start + size] = diff[rng.integers(0, len(diff), size=(size, len(diff)))].mean(
            axis=1
        )
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def compare_paired(y_true, pred_a, pred_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """Everything the report says about one pair: accuracies, the difference with its paired 95%
    interval, the discordant counts, McNemar's exact p and whether the two are distinguishable at
    ALPHA (both the interval excludes 0 and p < ALPHA)."""
    y = np.asarray(y_true)
    right_a, right_b = np.asarray(pred_a) == y, np.asarray(pred_b) == y
    diff, lo, hi = paired_bootstrap(right_a, right_b, n_boot=n_boot, seed=seed)
    only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    p = mcnemar_exact(only_a, only_b)
    return {
        "n": len(y),
        "accuracy_a": float(right_a.mean()),
        "accuracy_b": float(right_b.mean()),
        "difference": diff,
        "ci95": [lo, hi],
        "only_a_right": only_a,
        "only_b_right": only_b,
        "mcnemar_p": p,
        "distinguishable": bool(p < ALPHA and (lo > 0 or hi < 0)),
    }


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the mean of `values` over resamples (e.g. per-image
    deletion AUCs)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap_mean needs a non-empty 1-D array, got shape {values.shape}")
    return paired_bootstrap(values, np.zeros_like(values), n_boot=n_boot, seed=seed)
