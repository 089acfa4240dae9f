"""Classification metrics with 95% bootstrap intervals, and the per-image predictions table.

Plain NumPy (no Keras), so the study and the report can use it without a backend. Point estimates
match scikit-learn's (`zero_division=0`); the intervals resample images with replacement (percentile
bootstrap), which is what "how sure are we about this test accuracy" needs on a few hundred test
images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

_BOOT_CHUNK = 200  # bootstrap replicates per vectorised chunk (bounds memory on large splits)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts[i, j] = images of true class i predicted as class j."""
    codes = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and per-class/macro/weighted precision, recall, F1 from confusion matrices (..., K,
    K)."""
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    total = support.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        weights = support / np.maximum(total, 1)[..., None]
    # Macro averages run over the classes that occur (as truth or prediction), like scikit-learn's
    # default; otherwise a bootstrap resample that happens to miss a class would score it 0.
    present = (support + predicted) > 0
    n_present = np.maximum(present.sum(axis=-1), 1)
    out = {"accuracy": tp.sum(axis=-1) / np.maximum(total, 1)}
    for name, per_class in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"per_class_{name}"] = per_class
        out[f"macro_{name}"] = (per_class * present).sum(axis=-1) / n_present
        out[f"weighted_{name}"] = (per_class * weights).sum(axis=-1)
    return out


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Macro-averaged F1 (the per-epoch validation metric)."""
    return float(_scores(confusion_matrix(y_true, y_pred, num_classes))["macro_f1"])


def _bootstrap_confusions(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, n_boot: int, rng: np.random.Generator
):
    n, kk = len(y_true), num_classes * num_classes
    codes = y_true * num_classes + y_pred
    for start in range(0, n_boot, _BOOT_CHUNK):
        size = min(_BOOT_CHUNK, n_boot - start)
        picks = codes[rng.integers(0, n, size=(size, n))]
        offsets = (np.arange(size) * kk)[:, None]
        yield np.bincount((picks + offsets).ravel(), minlength=size * kk).reshape(
            size, num_classes, num_classes
        )


def classification_metrics(
    y_true, probs, classes: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict:
    """JSON-ready metrics of predicted probabilities against integer labels.

    Returns accuracy and macro/weighted precision/recall/F1, each as {"value", "ci95": [low, high]};
    per-class precision/recall/F1/support; the confusion matrix (rows = true class) and n.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if probs.ndim != 2 or probs.shape != (len(y_true), k):
        raise ValueError(f"probs must have shape ({len(y_true)}, {k}), got {probs.shape}")
    if len(y_true) == 0:
        raise ValueError("no images to evaluate")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    point = _scores(cm)
    summary_keys = ["accuracy"] + [
        f"{avg}_{m}" for avg in ("macro", "weighted") for m in ("precision", "recall", "f1")
    ]
    boots = {key: [] for key in summary_keys}
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        for cms in _bootstrap_confusions(y_true, y_pred, k, n_boot, rng):
            scores = _scores(cms)
            for key in summary_keys:
                boots[key].append(scores[key])
    out: dict = {"n": int(len(y_true)), "classes": list(classes), "n_boot": int(n_boot)}
    for key in summary_keys:
        value = float(point[key])
        if n_boot > 0:
            ci = [float(v) for v in np.percentile(np.concatenate(boots[key]), [2.5, 97.5])]
        else:
            ci = [value, value]
        out[key] = {"value": value, "ci95": ci}
    support = cm.sum(axis=1)
    out["per_class"] = {
        name: {
            "precision": float(point["per_class_precision"][i]),
            "recall": float(point["per_class_recall"][i]),
            "f1": float(point["per_class_f1"][i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    out["confusion_matrix"] = cm.tolist()
    return out


def predictions_table(paths: Sequence[str], y_true, probs, classes: Sequence[str]) -> pd.DataFrame:
    """One row per image: path, true label, predicted label, and p_<class> for every class."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if not (len(paths) == len(y_true) == len(probs)):
        raise ValueError(
            f"paths ({len(paths)}), labels ({len(y_true)}) and probs ({len(probs)}) differ in "
            "length"
        )
    names = np.asarray(classes, dtype=object)
    table = pd.DataFrame(
        {"path": list(paths), "label": names[y_true], "predicted": names[probs.argmax(axis=1)]}
    )
    for i, name in enumerate(classes):
        table[f"p_{name}"] = probs[:, i]
    return table
