"""The report's opening verdict: what a reader can conclude and what to do next, before any table.

From a loaded study (`study.report.load_study`): the ranking by test accuracy; for every pair of
backbones a paired comparison on the same test images (`fer.evaluate.compare`: paired bootstrap
interval of the accuracy difference and McNemar's exact test), saying "indistinguishable on this
test split" where it is; and flags:

- chance: a best model whose test accuracy interval covers 1/K, or that predicts one class for at
  least ONE_CLASS_SHARE of the test images;
- undertrained: the best trial's lowest val_loss is at its very last epoch and still falling there
  (more than STILL_IMPROVING, relative, and STILL_IMPROVING_ABS below every earlier epoch): the
  budget, not the data, stopped it;
- collapsed: in ANY trial, a stage that ends collapsed (fer.train.collapse: uniform outputs or one
  class predicted, as the trial recorded in collapse.json, the same definition as training's
  warning) after an epoch that was not, or that diverged (non-finite loss); named with the
  hyperparameters that did it, because early stopping then silently keeps an earlier (e.g.
  head-stage) model; and trials that never left collapse at all ("never learned");
- hyperparameters at the edge of their searched range (computed by the report, passed in);
- the spread over seeds where the space's `final_seeds` retrained the best configuration.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from fer.core import names
from fer.evaluate.compare import compare_paired
from fer.train.collapse import read_collapsed_epochs

ONE_CLASS_SHARE = (
    0.9  # a model that gives one class to >= 90% of the test images has learnt (almost) nothing
)
STILL_IMPROVING = 0.01  # the last epoch's val_loss is >1% below every earlier one ...
STILL_IMPROVING_ABS = (
    0.01  # ... and by more than 0.01 (a near-perfect model's loss shrinks forever)
)


# ------------------------------------------------------------------------------------------ history
# flags
def stage_problems(
    history: pd.DataFrame, k: int, collapsed: dict[tuple[str, int], str]
) -> list[dict]:
    """Collapsed or diverged stages of one trial's history, and 'never learned' for a trial
    collapsed in every epoch. `collapsed`: the trial's own record, {(stage, epoch): reason}
    (fer.train.collapse.read_collapsed_epochs). Each problem: {kind, stage, epoch, val_loss, text}.
    """
    if history is None or history.empty or "stage" not in history:
        return []
    rows = history.to_dict("records")

    def reason(row) -> str | None:
        return collapsed.get((str(row.get("stage")), int(row["epoch"]))) if "epoch" in row else None

    if all(reason(r) for r in rows):
        last = rows[-1]
        return [
            {
                "kind": "never learned",
                "stage": last.get("stage"),
                "epoch": last.get("epoch"),
                "val_loss": _float(last.get("val_loss")),
                "text": f"collapsed in all {len(rows)} epochs ({reason(last)}; val_loss "
                f"{_fmt(last.get('val_loss'))}, ln {k} = {math.log(k):.3f})",
            }
        ]
    problems = []
    for stage in dict.fromkeys(r.get("stage") for r in rows):
        idx = [i for i, r in enumerate(rows) if r.get("stage") == stage]
        last = rows[idx[-1]]
        losses = [_float(rows[i].get("loss")) for i in idx] + [
            _float(rows[i].get("val_loss")) for i in idx
        ]
        if any(v is None for v in losses):
            problems.append(
                {
                    "kind": "diverged",
                    "stage": stage,
                    "epoch": last.get("epoch"),
                    "val_loss": None,
                    "text": f"the {stage} stage diverged (non-finite loss by epoch {last.get('epoch')})",
                }
            )
            continue
        start = next((i for i in idx if all(reason(rows[j]) for j in idx if j >= i)), None)
        # ended collapsed after an epoch that was not: a from-scratch model's first head epoch on
        # random frozen features is at chance by design and is no collapse (it had nothing to lose)
        if start is not None and any(not reason(r) for r in rows[:start]):
            first = rows[start]
            problems.append(
                {
                    "kind": "collapsed",
                    "stage": stage,
                    "epoch": first.get("epoch"),
                    "val_loss": _float(last.get("val_loss")),
                    "text": f"the {stage} stage collapsed from epoch {first.get('epoch')} on ({reason(last)}; "
                    f"val_loss {_fmt(last.get('val_loss'))}, ln {k} = {math.log(k):.3f})",
                }
            )
    return problems


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
        f"undertrained: raise epochs_{stage}. Its lowest val_loss ({losses[-1]:.3f}) is at its last epoch "
        f"(epoch {int(last['epoch'])}, {stage} stage), {100 * (1 - losses[-1] / before):.0f}% below every "
        "earlier epoch: it was still improving when the epoch budget ran out"
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
                f"{name} is at chance level: its test accuracy interval [{lo:.3f}, {hi:.3f}] covers 1/{k} = {1 / k:.3f}"
            )
    cm = np.asarray(test.get("confusion_matrix") or [], dtype=float)
    if cm.ndim == 2 and cm.sum() > 0:
        shares = cm.sum(axis=0) / cm.sum()
        top = int(shares.argmax())
        if shares[top] >= ONE_CLASS_SHARE:
            label = classes[top] if top < len(classes) else str(top)
            out.append(
                f"{name} predicts '{label}' for {100 * shares[top]:.0f}% of the test images: it has not "
                "learnt to tell the classes apart"
            )
    return out


# ---------------------------------------------------------------------------------------------- the
# verdict
def build_verdict(study, edge_flags: list[str] = ()) -> dict:
    """{'ranking', 'pairs', 'flags', 'seeds'} for a loaded study; JSON-ready."""
    ok = sorted(
        study.ok,
        key=lambda b: (-b.test["accuracy"]["value"], -b.test.get("macro_f1", {}).get("value", 0)),
    )
    ranking = [
        {
            "backbone": b.name,
            "accuracy": b.test["accuracy"]["value"],
            "ci95": b.test["accuracy"]["ci95"],
            "macro_f1": b.test.get("macro_f1", {}).get("value"),
            "n": b.test.get("n"),
        }
        for b in ok
    ]
    predictions = {b.name: _predictions(b.folder) for b in ok}
    pairs = []
    for a, b in itertools.combinations(ok, 2):
        pa, pb = predictions[a.name], predictions[b.name]
        if pa is None or pb is None:
            continue
        both = pa.merge(pb, on=["path", "label"], suffixes=("_a", "_b"))
        if both.empty:
            continue
        result = compare_paired(both["label"], both["predicted_a"], both["predicted_b"])
        pairs.append({"a": a.name, "b": b.name, **result})
    flags = []
    for b in ok:
        flags += [
            {"kind": "chance", "backbone": b.name, "text": t} for t in chance_flags(b.name, b.test)
        ]
        text = undertrained(b.history)
        if text:
            flags.append(
                {
                    "kind": "undertrained",
                    "backbone": b.name,
                    "text": f"{b.name}'s best trial is {text}",
                }
            )
    flags += _trial_flags(study)
    flags += [
        {"kind": "edge", "backbone": text.split(":", 1)[0], "text": text} for text in edge_flags
    ]
    seeds = []
    for b in ok:
        stats = (b.seeds or {}).get("test_accuracy")
        if stats and stats.get("n"):
            seeds.append(
                {
                    "backbone": b.name,
                    **{k: stats.get(k) for k in ("n", "mean", "std", "min", "max")},
                }
            )
    return {"ranking": ranking, "pairs": pairs, "flags": flags, "seeds": seeds}


def add_verdict(doc, study, edge_flags: list[str] = ()) -> dict:
    """Add the 'Verdict' section to a report document (study.report.Document); return the verdict."""
    verdict = build_verdict(study, edge_flags)
    doc.heading("Verdict")
    ranking = verdict["ranking"]
    if not ranking:
        doc.warn(
            "no backbone has a tested best model: there is no verdict (see 'Failed or missing backbones')"
        )
    else:
        doc.para(_headline(verdict))
        doc.para(
            "Ranking by test accuracy (95% bootstrap interval over test images): "
            + "; ".join(
                f"{i}. {r['backbone']} {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                for i, r in enumerate(ranking, 1)
            )
            + "."
        )
    if verdict["pairs"]:
        doc.para(
            "Paired comparisons on the same test images (difference in accuracy with its paired bootstrap "
            "95% interval; McNemar's exact test on the images only one of the two got right; p-values "
            "not corrected for multiple comparisons):"
        )
        for p in verdict["pairs"]:
            lo, hi = p["ci95"]
            outcome = (
                f"{p['a'] if p['difference'] > 0 else p['b']} is more accurate on this test split"
                if p["distinguishable"]
                else "indistinguishable on this test split"
            )
            doc.para(
                f"{p['a']} vs {p['b']}: {p['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] on {p['n']} images; "
                f"McNemar p {_p(p['mcnemar_p'])} ({p['only_a_right']} images only {p['a']} got right, "
                f"{p['only_b_right']} only {p['b']}): {outcome}."
            )
    elif len(ranking) > 1:
        doc.para(
            "No paired comparison: the best models' test_predictions.csv files are missing or do not share test images."
        )
    for s in verdict["seeds"]:
        doc.para(
            f"{s['backbone']}, best configuration retrained with {s['n']} other seeds: test accuracy "
            f"{s['mean']:.3f} ± {s['std']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}); differences "
            "between backbones smaller than this spread can flip with the seed."
        )
    for flag in verdict["flags"]:
        doc.warn(flag["text"])
    if ranking and not verdict["flags"]:
        doc.para(
            "No warning: no best model at chance level, none stopped while still improving, no collapsed "
            "trial, no best hyperparameter at the edge of its range."
        )
    return verdict


# ------------------------------------------------------------------------------------------------
# helpers
def _headline(verdict: dict) -> str:
    """One sentence: the best backbone and which others the test split cannot tell apart from it."""
    best = verdict["ranking"][0]
    text = f"Best on the test split: {best['backbone']} (accuracy {best['accuracy']:.3f})."
    against = [p for p in verdict["pairs"] if best["backbone"] in (p["a"], p["b"])]
    if len(verdict["ranking"]) == 1:
        return text + " It is the only backbone with a tested model."
    if not against:
        return text + " No paired comparison was possible."
    tied = [
        p["b"] if p["a"] == best["backbone"] else p["a"]
        for p in against
        if not p["distinguishable"]
    ]
    if not tied:
        return (
            text
            + " It is more accurate than every other backbone (paired tests on the same test images)."
        )
    return text + f" Indistinguishable from it on this test split: {', '.join(tied)}."


def _trial_flags(study) -> list[dict]:
    """Collapsed/diverged stages and never-learning trials over every trial with a history."""
    k = _num_classes(study)
    if k is None or study.trials is None or study.trials.empty or "trial_dir" not in study.trials:
        return []
    tuned = list((study.space.get("space") or {}).keys())
    selected = {}
    for b in study.ok:
        sel = _read_json(b.folder / names.SELECTION_FILE) if b.folder else None
        if sel:
            selected[str(sel.get("trial_id"))] = b.name
    flags = []
    for row in study.trials.to_dict("records"):
        history = _trial_history(study.folder, row)
        collapsed = read_collapsed_epochs(Path(study.folder) / str(row["trial_dir"]))
        for problem in stage_problems(history, k, collapsed):
            params = ", ".join(f"{key}={_fmt(row.get(key))}" for key in tuned if key in row)
            kept = ""
            if problem["kind"] != "never learned" and _float(row.get("best_epoch")) is not None:
                epoch = int(row["best_epoch"])
                stage = (
                    history.loc[history["epoch"] == epoch, "stage"] if "epoch" in history else []
                )
                kept = f"; the trial kept its epoch {epoch}{f' ({stage.iloc[0]} stage)' if len(stage) else ''} model"
            mark = (
                f" (the selected model of {selected[str(row['trial_id'])]})"
                if str(row.get("trial_id")) in selected
                else ""
            )
            flags.append(
                {
                    "kind": problem["kind"],
                    "backbone": str(row.get("backbone")),
                    "trial_id": str(row.get("trial_id")),
                    "stage": problem["stage"],
                    "text": f"{row.get('backbone')} trial {row.get('trial_id')}{mark} ({params}): "
                    f"{problem['text']}{kept}",
                }
            )
    return flags


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


def _predictions(folder: Path | None) -> pd.DataFrame | None:
    try:
        frame = pd.read_csv(
            Path(folder) / "test_predictions.csv", usecols=["path", "label", "predicted"]
        )
    except (OSError, ValueError, TypeError):
        return None
    return frame.astype(str)


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


def _p(p: float) -> str:
    """'= 0.0078' or '< 0.001' (never 'p = < 0.001')."""
    return f"= {p:.2g}" if p >= 0.001 else "< 0.001"
