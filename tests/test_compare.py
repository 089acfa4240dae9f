"""Paired comparison of two classifiers (fer.evaluate.compare): McNemar's exact test against scipy,
bootstrap cases."""

from __future__ import annotations

import numpy as np
import pytest

from fer.evaluate.compare import compare_paired, mcnemar_exact, paired_bootstrap


@pytest.mark.parametrize(
    "b,c", [(0, 0), (1, 0), (0, 5), (3, 3), (7, 2), (2, 9), (12, 30), (150, 190), (0, 40)]
)
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    stats = pytest.importorskip("scipy.stats")
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_mcnemar_exact_hand_computed():
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 * P(X = 0) for X ~ Bin(5, 1/2)
    assert mcnemar_exact(1, 5) == pytest.approx(2 * 7 / 64)  # 2 * (1 + 6) / 2**6
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_bootstrap_degenerate_and_known_cases():
    same = np.array([1, 0, 1, 1, 0, 1], bool)
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(np.ones(50), np.zeros(50)) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.8
    b = a.copy()
    b[np.flatnonzero(a)[:40]] = False  # B wrong on 40 images A got right: difference exactly 0.1
    diff, lo, hi = paired_bootstrap(a, b, seed=3)
    assert diff == pytest.approx(0.1)
    # only discordant images vary: sd of the mean = sqrt(p(1-p)/n) with p = 0.1, n = 400 -> 0.015
    assert lo == pytest.approx(0.1 - 1.96 * 0.015, abs=0.008) and hi == pytest.approx(
        0.1 + 1.96 * 0.015, abs=0.008
    )
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:-1])


def test_compare_paired_says_when_two_models_differ():
    y = np.repeat(np.arange(5), 40)
    good = y.copy()
    poor = y.copy()
    poor[::4] = (poor[::4] + 1) % 5  # 50 errors that `good` does not make
    result = compare_paired(y, good, poor)
    assert result["accuracy_a"] == 1.0 and result["accuracy_b"] == 0.75
    assert (result["only_a_right"], result["only_b_right"]) == (50, 0)
    assert result["mcnemar_p"] < 1e-10 and result["ci95"][0] > 0 and result["distinguishable"]
    close = good.copy()
    close[:3] = (close[:3] + 1) % 5  # 3 errors vs 0: not enough evidence
    result = compare_paired(y, good, close)
    assert result["mcnemar_p"] == pytest.approx(0.25) and not result["distinguishable"]
