"""fer.evaluate.metrics: point estimates agree with scikit-learn, intervals behave, tables are
complete."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion

from fer.evaluate.metrics import classification_metrics, macro_f1, predictions_table

CLASSES = ["angry", "fear", "happy", "sad", "surprise"]


def _noisy_predictions(n=300, accuracy=0.6, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    pred = np.where(rng.random(n) < accuracy, y, rng.integers(0, 5, n))
    probs = rng.random((n, 5)) * 0.5
    probs[np.arange(n), pred] += 1.0
    return y, probs / probs.sum(axis=1, keepdims=True), pred


def test_point_estimates_match_sklearn():
    y, probs, pred = _noisy_predictions()
    m = classification_metrics(y, probs, CLASSES, n_boot=200)
    assert m["n"] == 300
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        assert m[f"{avg}_precision"]["value"] == pytest.approx(p)
        assert m[f"{avg}_recall"]["value"] == pytest.approx(r)
        assert m[f"{avg}_f1"]["value"] == pytest.approx(f)
    p, r, f, s = precision_recall_fscore_support(y, pred, zero_division=0)
    for i, name in enumerate(CLASSES):
        assert m["per_class"][name] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        )
    assert m["confusion_matrix"] == sk_confusion(y, pred).tolist()
    assert macro_f1(y, pred, 5) == pytest.approx(m["macro_f1"]["value"])


def test_bootstrap_interval_contains_estimate_and_narrows_with_n():
    y, probs, _ = _noisy_predictions(n=200)
    small = classification_metrics(y, probs, CLASSES, n_boot=500, seed=3)
    y_big, probs_big, _ = _noisy_predictions(n=3000)
    big = classification_metrics(y_big, probs_big, CLASSES, n_boot=500, seed=3)
    for key in ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall"):
        low, high = small[key]["ci95"]
        assert 0.0 <= low < small[key]["value"] < high <= 1.0, key
    width = lambda m: m["accuracy"]["ci95"][1] - m["accuracy"]["ci95"][0]  # noqa: E731
    assert width(big) < width(small) / 2  # about 1/sqrt(15) as wide
    again = classification_metrics(y, probs, CLASSES, n_boot=500, seed=3)
    assert again["accuracy"]["ci95"] == small["accuracy"]["ci95"]  # seeded: repeatable


def test_confusion_matrix_sums_and_perfect_predictions():
    y = np.array([0, 1, 2, 3, 4, 0, 2, 2])
    probs = np.eye(5)[y] * 0.9 + 0.02
    m = classification_metrics(y, probs, CLASSES, n_boot=100)
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == len(y)
    assert cm.sum(axis=1).tolist() == [2, 1, 3, 1, 1]
    for key in ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall"):
        assert m[key]["value"] == 1.0
        assert m[key]["ci95"] == [1.0, 1.0]


def test_absent_class_scores_zero_not_nan():
    y = np.array([0, 0, 1, 1])
    probs = np.eye(5)[[0, 1, 1, 1]]
    m = classification_metrics(y, probs, CLASSES, n_boot=50)
    assert m["per_class"]["sad"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert all(np.isfinite(m[k]["value"]) for k in ("macro_f1", "weighted_f1"))
    # like scikit-learn, macro averages cover the classes that occur (angry, fear), not all five
    assert m["macro_recall"]["value"] == pytest.approx((0.5 + 1.0) / 2)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.zeros((3, 5)), CLASSES)
    with pytest.raises(ValueError, match="length"):
        predictions_table(["a.png"], [0, 1], np.zeros((2, 5)), CLASSES)


def test_predictions_table():
    probs = np.array([[0.1, 0.2, 0.5, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]])
    table = predictions_table(["happy/a.png", "sad/b.png"], [2, 3], probs, CLASSES)
    assert list(table.columns) == ["path", "label", "predicted"] + [f"p_{c}" for c in CLASSES]
    assert table["label"].tolist() == ["happy", "sad"]
    assert table["predicted"].tolist() == ["happy", "angry"]
    assert table["p_happy"].tolist() == [0.5, 0.1]
