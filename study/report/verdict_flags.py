"""What the verdict warns about, flag by flag (study.report.verdict puts them under the ranking).

- chance: a best model whose test accuracy interval covers 1/K, or that predicts one class for at
  least ONE_CLASS_SHARE of the test images;
- undertrained: the best trial's lowest val_loss is at its very last epoch and still falling there
  (more than STILL_IMPROVING, relative, and STILL_IMPROVING_ABS below every earlier epoch): the
  budget, not the data, stopped it;
- collapsed: in ANY trial, a stage that ends collapsed (fer.train.collapse: uniform outputs or one
  class predicted, as the trial recorded in collapse.json, the same definition as training's
  warning) after an epoch that was not, or that diverged (non-finite loss); named with the
  hyperparameters that did it, because early stopping then silently keeps an earlier (e.g.
  head-stage) model; and trials that never left collapse at all ("never learned").
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fer.core import names
from fer.train.collapse import read_collapsed_epochs

# a model that gives one class to >= 90% of the test images has learnt (almost) nothing
ONE_CLASS_SHARE = 0.9
# the last epoch's val_loss is >1% below every earlier one ...
STILL_IMPROVING = 0.01
# ... and by more than 0.01 (a near-perfect model's loss shrinks forever)
STILL_IMPROVING_ABS = 0.01


# ----------------------------------------------------------------------------- one trial's history


@dataclasses.dataclass(frozen=True)
class _TrialEpochs:
    """One trial's history, epoch by epoch, with its own record of the epochs that collapsed."""

    rows: list[dict]  # history.csv records
    k: int  # classes
    collapsed: dict  # {(stage, epoch): reason} (fer.train.collapse.read_collapsed_epochs)

    def reason(self, row: dict) -> str | None:
        """Why the epoch of `row` counts as collapsed, or None when it does not."""
        if "epoch" not in row:
            return None
        return self.collapsed.get((str(row.get("stage")), int(row["epoch"])))

    def chance_loss(self) -> str:
        return f"ln {self.k} = {math.log(self.k):.3f}"


def stage_problems(
    history: pd.DataFrame, k: int, collapsed: dict[tuple[str, int], str]
) -> list[dict]:
    """Collapsed or diverged stages of one trial's history, and 'never learned' for a trial
    collapsed in every epoch. `collapsed`: the trial's own record, {(stage, epoch): reason}
    (fer.train.collapse.read_collapsed_epochs). Each problem: {kind, stage, epoch, val_loss, text}.
    """
    if history is None or history.empty or "stage" not in history:
        return []
    epochs = _TrialEpochs(history.to_dict("records"), k, collapsed)
    if all(epochs.reason(r) for r in epochs.rows):
        return [_never_learned(epochs)]
    problems = []
    for stage in dict.fromkeys(r.get("stage") for r in epochs.rows):
        idx = [i for i, r in enumerate(epochs.rows) if r.get("stage") == stage]
        problem = _diverged(epochs, stage, idx) or _collapsed(epochs, stage, idx)
        if problem:
            problems.append(problem)
    return problems


def _never_learned(epochs: _TrialEpochs) -> dict:
    last = epochs.rows[-1]
    return {
        "kind": "never learned",
        "stage": last.get("stage"),
        "epoch": last.get("epoch"),
        "val_loss": _float(last.get("val_loss")),
        "text": f"collapsed in all {len(epochs.rows)} epochs ({epochs.reason(last)}; val_loss "
        f"{_fmt(last.get('val_loss'))}, {epochs.chance_loss()})",
    }


def _diverged(epochs: _TrialEpochs, stage, idx: list[int]) -> dict | None:
    """The stage (epochs `idx`) has a non-finite training or validation loss."""
    rows = epochs.rows
    last = rows[idx[-1]]
    losses = [_float(rows[i].get("loss")) for i in idx] + [
        _float(rows[i].get("val_loss")) for i in idx
    ]
    if not any(v is None for v in losses):
        return None
    return {
        "kind": "diverged",
        "stage": stage,
        "epoch": last.get("epoch"),
        "val_loss": None,
        "text": f"the {stage} stage diverged (non-finite loss by epoch {last.get('epoch')})",
    }


def _collapsed(epochs: _TrialEpochs, stage, idx: list[int]) -> dict | None:
    """The stage (epochs `idx`) ends collapsed after an epoch that was not.

    A from-scratch model's first head epoch on random frozen features is at chance by design and is
    no collapse (it had nothing to lose)."""
    rows = epochs.rows
    start = next((i for i in idx if all(epochs.reason(rows[j]) for j in idx if j >= i)), None)
    if start is None or not any(not epochs.reason(r) for r in rows[:start]):
        return None
    first, last = rows[start], rows[idx[-1]]
    return {
        "kind": "collapsed",
        "stage": stage,
        "epoch": first.get("epoch"),
        "val_loss": _float(last.get("val_loss")),
        "text": f"the {stage} stage collapsed from epoch {first.get('epoch')} on "
        f"({epochs.reason(last)}; val_loss {_fmt(last.get('val_loss'))}, {epochs.chance_loss()})",
    }


def undertrained(history: pd.DataFrame) -> str | None:
    """A sentence if the trial's lowest val_loss is at its last epoch and still clearly falling,
    else None."""
    if history is None or history.empty or "val_loss" not in history:
        return None
    losses = pd.to_numeric(history["val_loss"], errors="coerce").to_numpy()
    if len(losses) < 2 or not np.isfinite(losses[-1]) or not np.isfinite(losses[:-1]).any():
        return None
    before = float(np.nanmin(losses[:-1]))
    if before - losses[-1] <= max(STILL_IMPROVING * before, STILL_IMPROVING_ABS):
        return None
    last = history.iloc[-1]
    stage = last.get("stage", "last")
    return (
        f"undertrained: raise epochs_{stage}. Its lowest val_loss ({losses[-1]:.3f}) is at its "
        f"last epoch (epoch {int(last['epoch'])}, {stage} stage), "
        f"{100 * (1 - losses[-1] / before):.0f}% below every earlier epoch: it was still improving "
        "when the epoch budget ran out"
    )


def chance_flags(name: str, test: dict) -> list[str]:
    """A best model at chance level: its accuracy interval covers 1/K, or one class gets most
    predictions."""
    classes = test.get("classes") or list(test.get("per_class", {}))
    k = len(classes)
    out = []
    if k >= 2:
        lo, hi = test["accuracy"]["ci95"]
        if lo <= 1 / k <= hi:
            out.append(
                f"{name} is at chance level: its test accuracy interval [{lo:.3f}, {hi:.3f}] "
                f"covers 1/{k} = {1 / k:.3f}"
            )
    cm = np.asarray(test.get("confusion_matrix") or [], dtype=float)
    if cm.ndim == 2 and cm.sum() > 0:
        shares = cm.sum(axis=0) / cm.sum()
        top = int(shares.argmax())
        if shares[top] >= ONE_CLASS_SHARE:
            label = classes[top] if top < len(classes) else str(top)
            out.append(
                f"{name} predicts '{label}' for {100 * shares[top]:.0f}% of the test images: it "
                "has not learnt to tell the classes apart"
            )
    return out


# ---------------------------------------------------------------------------------- every trial


def trial_flags(study) -> list[dict]:
    """Collapsed/diverged stages and never-learning trials over every trial with a history."""
    k = _num_classes(study)
    if k is None or study.trials is None or study.trials.empty or "trial_dir" not in study.trials:
        return []
    tuned = list((study.space.get("space") or {}).keys())
    selected = _selected_trials(study)
    flags = []
    for row in study.trials.to_dict("records"):
        history = _trial_history(study.folder, row)
        collapsed = read_collapsed_epochs(Path(study.folder) / str(row["trial_dir"]))
        for problem in stage_problems(history, k, collapsed):
            flags.append(_trial_flag(row, problem, history, tuned, selected))
    return flags


def _selected_trials(study) -> dict[str, str]:
    """trial id -> backbone, for the trials the study selected as best."""
    selected = {}
    for b in study.ok:
        sel = _read_json(b.folder / names.SELECTION_FILE) if b.folder else None
        if sel:
            selected[str(sel.get("trial_id"))] = b.name
    return selected


def _trial_flag(row: dict, problem: dict, history, tuned: list, selected: dict) -> dict:
    """A trial's problem, named with its hyperparameters, the model it kept and whether the study
    selected it."""
    params = ", ".join(f"{key}={_fmt(row.get(key))}" for key in tuned if key in row)
    kept = ""
    if problem["kind"] != "never learned" and _float(row.get("best_epoch")) is not None:
        epoch = int(row["best_epoch"])
        stage = history.loc[history["epoch"] == epoch, "stage"] if "epoch" in history else []
        kept = (
            f"; the trial kept its epoch {epoch}"
            f"{f' ({stage.iloc[0]} stage)' if len(stage) else ''} model"
        )
    mark = (
        f" (the selected model of {selected[str(row['trial_id'])]})"
        if str(row.get("trial_id")) in selected
        else ""
    )
    return {
        "kind": problem["kind"],
        "backbone": str(row.get("backbone")),
        "trial_id": str(row.get("trial_id")),
        "stage": problem["stage"],
        "text": f"{row.get('backbone')} trial {row.get('trial_id')}{mark} ({params}): "
        f"{problem['text']}{kept}",
    }


def _trial_history(folder: Path, row: dict) -> pd.DataFrame | None:
    trial_dir = row.get("trial_dir")
    if not isinstance(trial_dir, str) or not trial_dir:
        return None
    path = Path(folder) / trial_dir
    try:
        return pd.read_csv(path / names.HISTORY_FILE)
    except (OSError, ValueError):
        outcome = _read_json(path / names.OUTCOME_FILE) or {}
        return pd.DataFrame(outcome["history"]) if outcome.get("history") else None


def _num_classes(study) -> int | None:
    for b in study.ok:
        classes = b.test.get("classes") or list(b.test.get("per_class", {}))
        if classes:
            return len(classes)
    counts = (study.audit or {}).get("counts")
    return len(counts) if counts else None


# ------------------------------------------------------------------------------------------ helpers


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _float(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    return str(value)
