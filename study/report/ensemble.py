"""The ensemble row: every backbone's best model, their softmax outputs averaged on the test split.

Why: backbones that make different mistakes may do better together than any one of them, and a
reader wants to know that before choosing one. The ensemble selects nothing on the test split: its
members are all the study's best models (each chosen on validation), with equal weights. It is
computed from the test probabilities each best model stored (`best/<backbone>/test_predictions.csv`,
`p_<class>` columns) rather than by running the models again, so the report needs no model and
gets exactly the numbers the members were reported with. It gets the same treatment as a backbone:
its metrics with 95% bootstrap intervals (`fer.evaluate.metrics`, seed 0) and a paired comparison
(paired bootstrap, McNemar's exact test) against each member on the same images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from fer.core import names
from fer.evaluate.compare import compare_paired
from fer.evaluate.ensemble_folder import ensemble_name
from fer.evaluate.metrics import classification_metrics

ENSEMBLE_STATUS = "ensemble"  # comparison.csv `status` of the ensemble row
PROBABILITY_PREFIX = "p_"


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """The averaged predictions of `members` on the test images they all predicted."""

    members: list[str]
    classes: list[str]
    predictions: pd.DataFrame  # path, label, predicted, and p_<class> (the mean)
    metrics: dict  # fer.evaluate.metrics.classification_metrics
    pairs: list[dict]  # compare_paired, a = the ensemble, b = each member

    @property
    def name(self) -> str:
        return ensemble_name(len(self.members))


def build_ensemble(ok: list) -> Ensemble | None:
    """The ensemble of the tested best models (`BackboneResult`s), or None when fewer than two
    stored test probabilities for the same classes and images."""
    stored = {b.name: _probabilities(b.folder) for b in ok}
    stored = {name: frame for name, frame in stored.items() if frame is not None}
    if len(stored) < 2:
        return None
    classes = _shared_classes(ok, stored)
    if classes is None:
        return None
    columns = [PROBABILITY_PREFIX + c for c in classes]
    joined = _on_shared_images(stored, columns)
    if joined.empty:
        return None
    members = list(stored)
    probs = np.mean([joined[[f"{m}:{c}" for c in columns]].to_numpy() for m in members], axis=0)
    index = {c: i for i, c in enumerate(classes)}
    labels = joined["label"].map(index).to_numpy()
    predicted = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
    frame = pd.DataFrame({"path": joined["path"], "label": joined["label"], "predicted": predicted})
    for i, column in enumerate(columns):
        frame[column] = probs[:, i]
    name = ensemble_name(len(members))
    pairs = [{"a": name, "b": m, **_compare(frame, joined, m)} for m in members]
    metrics = classification_metrics(labels, probs, classes, seed=0)
    return Ensemble(members, classes, frame, metrics, pairs)


def _compare(frame: pd.DataFrame, joined: pd.DataFrame, member: str) -> dict:
    return compare_paired(frame["label"], frame["predicted"], joined[f"{member}:predicted"])


def _probabilities(folder: Path | None) -> pd.DataFrame | None:
    """A best model's stored test predictions with their probabilities, or None (not stored,
    unreadable, or written without probabilities)."""
    if folder is None:
        return None
    try:
        frame = pd.read_csv(Path(folder) / names.predictions_file("test"))
    except (OSError, ValueError):
        return None
    if not {"path", "label", "predicted"} <= set(frame.columns):
        return None
    frame[["path", "label", "predicted"]] = frame[["path", "label", "predicted"]].astype(str)
    return frame


def _shared_classes(ok: list, stored: dict[str, pd.DataFrame]) -> list[str] | None:
    """The class order of the members' test metrics when all agree and every member stored a
    probability for each class; None otherwise."""
    orders = {tuple(b.test.get("classes") or ()) for b in ok if b.name in stored}
    if len(orders) != 1:
        return None
    classes = list(orders.pop())
    columns = {PROBABILITY_PREFIX + c for c in classes}
    if not classes or any(not columns <= set(f.columns) for f in stored.values()):
        return None
    return classes


def _on_shared_images(stored: dict[str, pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """One row per test image every member predicted (path and label agree): each member's
    probabilities as `<member>:p_<class>` and its prediction as `<member>:predicted`."""
    joined = None
    for name, frame in stored.items():
        own = frame[["path", "label", "predicted", *columns]].rename(
            columns={c: f"{name}:{c}" for c in ["predicted", *columns]}
        )
        joined = own if joined is None else joined.merge(own, on=["path", "label"])
    return joined.reset_index(drop=True)


def ensemble_row(ensemble: Ensemble, params: int | None, summary_metrics) -> dict:
    """The ensemble's comparison.csv row: the backbone rows' score columns, its members and the
    sum of their parameters."""
    row: dict = {"backbone": ensemble.name, "status": ENSEMBLE_STATUS}
    for key, _ in summary_metrics:
        metric = ensemble.metrics[key]
        row[key], (row[f"{key}_lo"], row[f"{key}_hi"]) = metric["value"], metric["ci95"]
    for cls, per in ensemble.metrics["per_class"].items():
        row[f"f1_{cls}"] = per["f1"]
    row["n_test"] = ensemble.metrics["n"]
    row["params"] = params
    row["note"] = (
        "softmax mean of the best models of " + ", ".join(ensemble.members) + " (equal weights)"
    )
    return row
