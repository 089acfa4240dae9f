"""The report's opening verdict: what a reader can conclude and what to do next, before any table.

From a loaded study (`study.report.load_study`): the ranking by test accuracy; for every pair of
backbones a paired comparison on the same test images (`fer.evaluate.compare`: paired bootstrap
interval of the accuracy difference and McNemar's exact test), saying "indistinguishable on this
test split" where it is; and flags (study.report.verdict_flags):

- chance: a best model at chance level;
- undertrained: a best trial still improving when its epoch budget ran out;
- collapsed or diverged stages in ANY trial, and trials that never learned;
- hyperparameters at the edge of their searched range (computed by the report, passed in);
- the spread over seeds where the space's `final_seeds` retrained the best configuration.

With two or more tested best models it also gives the ensemble of them (study.report.ensemble):
its accuracy and its paired comparison with each member.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd

from fer.evaluate.compare import compare_paired
from study.report.verdict_flags import chance_flags, stage_problems, trial_flags, undertrained

# the flags' functions stay importable from here, where the verdict is
__all__ = ["add_verdict", "build_verdict", "chance_flags", "stage_problems", "undertrained"]


def build_verdict(study, edge_flags: list[str] = ()) -> dict:
    """{'ranking', 'pairs', 'flags', 'seeds'} for a loaded study; JSON-ready."""
    ok = sorted(
        study.ok,
        key=lambda b: (-b.test["accuracy"]["value"], -b.test.get("macro_f1", {}).get("value", 0)),
    )
    ranking, pairs = _ranking(ok), _pairs(ok)
    flags = _best_model_flags(ok) + trial_flags(study)
    flags += [
        {"kind": "edge", "backbone": text.split(":", 1)[0], "text": text} for text in edge_flags
    ]
    return {
        "ranking": ranking,
        "pairs": pairs,
        "flags": flags,
        "seeds": _seeds(ok),
        "ensemble": _ensemble(study),
    }


def _ensemble(study) -> dict | None:
    """The best models' softmax mean (study.report.ensemble): its accuracy with its interval and
    its paired comparison with each member; None without one."""
    ensemble = getattr(study, "ensemble", None)
    if ensemble is None:
        return None
    accuracy = ensemble.metrics["accuracy"]
    return {
        "name": ensemble.name,
        "members": list(ensemble.members),
        "accuracy": accuracy["value"],
        "ci95": accuracy["ci95"],
        "n": ensemble.metrics["n"],
        "pairs": ensemble.pairs,
    }


def _ranking(ok: list) -> list[dict]:
    return [
        {
            "backbone": b.name,
            "accuracy": b.test["accuracy"]["value"],
            "ci95": b.test["accuracy"]["ci95"],
            "macro_f1": b.test.get("macro_f1", {}).get("value"),
            "n": b.test.get("n"),
        }
        for b in ok
    ]


def _pairs(ok: list) -> list[dict]:
    """Every pair of best models compared on the test images both predicted (paired)."""
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
    return pairs


def _best_model_flags(ok: list) -> list[dict]:
    """Best models at chance level or stopped while still improving."""
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
    return flags


def _seeds(ok: list) -> list[dict]:
    """The test accuracy's spread where the best configuration was retrained with other seeds."""
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
    return seeds


def add_verdict(doc, study, edge_flags: list[str] = ()) -> dict:
    """Add the 'Verdict' section to a report document (study.report.Document); return the
    verdict."""
    verdict = build_verdict(study, edge_flags)
    doc.heading("Verdict")
    ranking = verdict["ranking"]
    _write_ranking(doc, verdict)
    if verdict["pairs"]:
        _write_pairs(doc, verdict["pairs"])
    elif len(ranking) > 1:
        doc.para(
            "No paired comparison: the best models' test_predictions.csv files are missing or do "
            "not share test images."
        )
    if verdict["ensemble"]:
        _write_ensemble(doc, verdict["ensemble"])
    for s in verdict["seeds"]:
        doc.para(
            f"{s['backbone']}, best configuration retrained with {s['n']} other seeds: test "
            f"accuracy {s['mean']:.3f} ± {s['std']:.3f} (min {s['min']:.3f}, max {s['max']:.3f}); "
            "differences between backbones smaller than this spread can flip with the seed."
        )
    for flag in verdict["flags"]:
        doc.warn(flag["text"])
    if ranking and not verdict["flags"]:
        doc.para(
            "No warning: no best model at chance level, none stopped while still improving, no "
            "collapsed trial, no best hyperparameter at the edge of its range."
        )
    return verdict


def _write_ranking(doc, verdict: dict) -> None:
    """The headline and the ranking with intervals, or a warning that there is nothing to rank."""
    ranking = verdict["ranking"]
    if not ranking:
        doc.warn(
            "no backbone has a tested best model: there is no verdict (see 'Failed or missing "
            "backbones')"
        )
        return
    doc.para(_headline(verdict))
    doc.para(
        "Ranking by test accuracy (95% bootstrap interval over test images): "
        + "; ".join(
            f"{i}. {r['backbone']} {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            for i, r in enumerate(ranking, 1)
        )
        + "."
    )


def _write_ensemble(doc, ensemble: dict) -> None:
    """The ensemble's accuracy and its paired comparison with each of its members."""
    lo, hi = ensemble["ci95"]
    doc.para(
        f"The {ensemble['name']} best models ({', '.join(ensemble['members'])}; the mean of their "
        "stored test softmax outputs, equal weights, so it selects nothing on the test split): "
        f"accuracy {ensemble['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] on {ensemble['n']} images. "
        "Against each of them:"
    )
    _pair_sentences(doc, ensemble["pairs"])


def _write_pairs(doc, pairs: list[dict]) -> None:
    """One sentence per pair: the paired difference, McNemar's test, and the outcome in words."""
    doc.para(
        "Paired comparisons on the same test images (difference in accuracy with its paired "
        "bootstrap 95% interval; McNemar's exact test on the images only one of the two got "
        "right; p-values not corrected for multiple comparisons):"
    )
    _pair_sentences(doc, pairs)


def _pair_sentences(doc, pairs: list[dict]) -> None:
    for p in pairs:
        lo, hi = p["ci95"]
        outcome = (
            f"{p['a'] if p['difference'] > 0 else p['b']} is more accurate on this test split"
            if p["distinguishable"]
            else "indistinguishable on this test split"
        )
        doc.para(
            f"{p['a']} vs {p['b']}: {p['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] on {p['n']} "
            f"images; McNemar p {_p(p['mcnemar_p'])} ({p['only_a_right']} images only {p['a']} "
            f"got right, {p['only_b_right']} only {p['b']}): {outcome}."
        )


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
            text + " It is more accurate than every other backbone (paired tests on the same test "
            "images)."
        )
    return text + f" Indistinguishable from it on this test split: {', '.join(tied)}."


# ------------------------------------------------------------------------------------------ helpers


def _predictions(folder: Path | None) -> pd.DataFrame | None:
    try:
        frame = pd.read_csv(
            Path(folder) / "test_predictions.csv", usecols=["path", "label", "predicted"]
        )
    except (OSError, ValueError, TypeError):
        return None
    return frame.astype(str)


def _p(p: float) -> str:
    """'= 0.0078' or '< 0.001' (never 'p = < 0.001')."""
    return f"= {p:.2g}" if p >= 0.001 else "< 0.001"
