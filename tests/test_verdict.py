"""The report's verdict (study.report.verdict, verdict_flags): chance, undertrained and collapse
flags on hand-made histories and predictions, and the paired comparisons of a small hand-made study.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from fer.train.collapse import CollapseLog
from study.report import BackboneResult, StudyResults
from study.report.verdict import _headline, build_verdict
from study.report.verdict_flags import chance_flags, stage_problems, undertrained

LN5 = math.log(5)


def _history(rows):
    """rows: (stage, loss, val_loss, val_macro_f1) -> a history.csv-like frame with global
    epochs."""
    return pd.DataFrame(
        [
            {
                "epoch": i + 1,
                "stage": s,
                "loss": loss,
                "accuracy": 0.5,
                "val_loss": v,
                "val_accuracy": 0.5,
                "val_macro_f1": f,
            }
            for i, (s, loss, v, f) in enumerate(rows)
        ]
    )


def test_collapsed_finetune_stage_is_flagged_learning_stages_are_not():
    """The flags follow the trial's own collapse record (fer.train.collapse, what training warned
    about), not a second reading of the losses."""
    uniform = "uniform outputs (mean top probability 0.201, 1/K = 0.200)"
    # the known case: the head stage learns, the first fine-tune epoch collapses to uniform outputs
    # (ln 5)
    collapsed = _history(
        [
            ("head", 1.5, 1.40, 0.35),
            ("head", 1.3, 1.25, 0.45),
            ("finetune", 3.0, LN5, 0.067),
            ("finetune", LN5, LN5 + 0.001, 0.067),
        ]
    )
    problems = stage_problems(collapsed, 5, {("finetune", 3): uniform, ("finetune", 4): uniform})
    assert [(p["kind"], p["stage"], p["epoch"]) for p in problems] == [("collapsed", "finetune", 3)]
    assert uniform in problems[0]["text"]
    # a stage that collapsed for an epoch and recovered is not flagged; one collapsed at its end is
    assert stage_problems(collapsed, 5, {("finetune", 3): uniform}) == []
    one_class = _history([("head", 1.4, 1.2, 0.5), ("finetune", 1.1, 2.4, 0.05)])
    reason = "one class predicted (97% of val images are 'happy')"
    assert [p["kind"] for p in stage_problems(one_class, 5, {("finetune", 2): reason})] == [
        "collapsed"
    ]
    # a from-scratch head stage at chance (recorded as collapsed), then learning: no collapse,
    # nothing lost
    scratch = _history(
        [("head", 1.61, 1.61, 0.07), ("finetune", 1.2, 0.9, 0.6), ("finetune", 0.6, 0.4, 0.85)]
    )
    assert stage_problems(scratch, 5, {("head", 1): uniform}) == []
    # losses near ln K without a collapse record (a from-scratch head stage, then learning): nothing
    # to flag
    learning = _history(
        [
            ("head", 1.62, 1.60, 0.15),
            ("head", 1.60, 1.59, 0.16),
            ("finetune", 1.2, 0.9, 0.6),
            ("finetune", 0.6, 0.4, 0.85),
        ]
    )
    assert stage_problems(learning, 5, {}) == []
    never = _history([("head", 1.61, 1.609, 0.067), ("finetune", 1.61, 1.608, 0.067)])
    record = {("head", 1): uniform, ("finetune", 2): uniform}
    assert [p["kind"] for p in stage_problems(never, 5, record)] == ["never learned"]
    diverged = _history([("head", 1.3, 1.2, 0.5), ("finetune", float("nan"), float("nan"), 0.067)])
    assert [p["kind"] for p in stage_problems(diverged, 5, {})] == ["diverged"]


def test_undertrained_only_when_the_last_epoch_is_clearly_best():
    still_falling = _history(
        [("head", 1.5, 1.4, 0.3), ("finetune", 1.0, 0.9, 0.6), ("finetune", 0.7, 0.6, 0.8)]
    )
    text = undertrained(still_falling)
    assert text.startswith("undertrained: raise epochs_finetune") and "epoch 3" in text
    plateau = _history(
        [("head", 1.5, 1.4, 0.3), ("finetune", 1.0, 0.50, 0.8), ("finetune", 0.7, 0.499, 0.8)]
    )
    assert undertrained(plateau) is None  # 0.2% better: converged, not undertrained
    stopped_early = _history(
        [("head", 1.5, 1.4, 0.3), ("finetune", 1.0, 0.5, 0.8), ("finetune", 0.7, 0.6, 0.8)]
    )
    assert undertrained(stopped_early) is None


def _test_metrics(accuracy, ci, cm):
    return {
        "classes": ["a", "b", "c", "d", "e"],
        "accuracy": {"value": accuracy, "ci95": ci},
        "macro_f1": {"value": accuracy, "ci95": ci},
        "confusion_matrix": cm,
        "n": int(np.sum(cm)),
    }


def test_chance_flags_interval_and_one_class():
    diagonal = (np.eye(5) * 30).astype(int).tolist()
    assert chance_flags("good", _test_metrics(1.0, [1.0, 1.0], diagonal)) == []
    one_class = np.zeros((5, 5), int)
    one_class[:, 2] = 30
    flags = chance_flags("flat", _test_metrics(0.2, [0.14, 0.26], one_class.tolist()))
    assert len(flags) == 2 and "covers 1/5" in flags[0] and "predicts 'c' for 100%" in flags[1]
    spread = (
        np.full((5, 5), 6)
    ).tolist()  # random guessing over all classes: the interval covers 0.2
    flags = chance_flags("guess", _test_metrics(0.2, [0.15, 0.26], spread))
    assert len(flags) == 1 and "covers" in flags[0]


def test_build_verdict_pairs_and_trial_flags(tmp_path):
    """Two backbones on the same 200 test images: one clearly better; one of its trials
    collapsed."""
    rng = np.random.default_rng(0)
    labels = np.repeat(list("abcde"), 40)
    paths = [f"{c}/img_{i}.png" for i, c in enumerate(labels)]
    good = labels.copy()
    good[rng.choice(200, 10, replace=False)] = "a"
    poor = labels.copy()
    poor[rng.choice(200, 60, replace=False)] = "b"
    backbones = []
    for name, pred in (("poor", poor), ("good", good)):
        folder = tmp_path / "best" / name
        folder.mkdir(parents=True)
        pd.DataFrame({"path": paths, "label": labels, "predicted": pred}).to_csv(
            folder / "test_predictions.csv", index=False
        )
        (folder / "selection.json").write_text(json.dumps({"trial_id": f"{name}_1"}))
        accuracy = float(np.mean(pred == labels))
        cm = (
            pd.crosstab(
                pd.Categorical(labels, list("abcde")),
                pd.Categorical(pred, list("abcde")),
                dropna=False,
            )
            .to_numpy()
            .tolist()
        )
        backbones.append(
            BackboneResult(
                name,
                "ok",
                folder=folder,
                test=_test_metrics(accuracy, [accuracy - 0.05, accuracy + 0.05], cm),
                history=_history(
                    [
                        ("head", 1.2, 1.0, 0.5),
                        ("finetune", 0.6, 0.5, 0.8),
                        ("finetune", 0.5, 0.52, 0.8),
                    ]
                ),
            )
        )
    (tmp_path / "trials" / "good_2").mkdir(parents=True)
    _history([("head", 1.5, 1.3, 0.4), ("finetune", LN5, LN5, 0.067)]).to_csv(
        tmp_path / "trials" / "good_2" / "history.csv", index=False
    )
    # the record training writes (fer.train.collapse) when the fine-tune epoch gives every image the
    # same outputs
    log = CollapseLog(
        tmp_path / "trials" / "good_2", {"lr_finetune": 3e-4, "unfreeze_layers": 30}, 5
    )
    log.check(
        "head",
        {"epoch": 1, "loss": 1.5, "val_loss": 1.3},
        np.eye(5)[np.arange(200) % 5] * 0.8 + 0.04,
    )
    log.check("finetune", {"epoch": 2, "loss": LN5, "val_loss": LN5}, np.full((200, 5), 0.2))
    trials = pd.DataFrame(
        [
            {
                "trial_id": "good_2",
                "backbone": "good",
                "trial_dir": "trials/good_2",
                "best_epoch": 1,
                "lr_finetune": 3e-4,
                "dropout": 0.5,
            }
        ]
    )
    space = {
        "space": {"lr_finetune": {"loguniform": [1e-5, 1e-3]}, "dropout": {"uniform": [0.1, 0.6]}}
    }
    study = StudyResults(tmp_path, "s", {"space": space}, None, trials, backbones, [])
    verdict = build_verdict(study, ["good: the best dropout = 0.6 sits at the upper edge"])
    assert _headline(verdict).startswith(
        f"Best on the test split: good (accuracy {np.mean(good == labels):.3f}). "
        "It is more accurate than every other backbone"
    )
    assert [r["backbone"] for r in verdict["ranking"]] == ["good", "poor"]
    (pair,) = verdict["pairs"]
    assert (pair["a"], pair["b"], pair["n"]) == ("good", "poor", 200)
    assert pair["difference"] > 0.15 and pair["distinguishable"] and pair["mcnemar_p"] < 1e-6
    kinds = [(f["kind"], f["backbone"]) for f in verdict["flags"]]
    assert kinds == [("collapsed", "good"), ("edge", "good")]
    collapse = verdict["flags"][0]["text"]
    assert "lr_finetune=0.0003" in collapse and "finetune stage collapsed" in collapse
    assert "kept its epoch 1 (head stage) model" in collapse


def test_undertrained_ignores_a_near_perfect_models_shrinking_loss():
    tiny = _history(
        [("head", 1.5, 1.4, 0.3), ("finetune", 0.1, 0.012, 1.0), ("finetune", 0.05, 0.006, 1.0)]
    )
    assert (
        undertrained(tiny) is None
    )  # 50% lower, but by 0.006: accuracy cannot improve, confidence does
