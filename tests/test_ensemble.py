"""The report's ensemble row (study.report.ensemble): two real tiny best models trained on the demo
faces, their stored test probabilities averaged by hand, against what the report shows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fer.evaluate.compare import compare_paired
from fer.evaluate.metrics import classification_metrics
from fer.train.trial import run_trial
from study.report import build_report, load_study
from study.report.verdict import build_verdict

BACKBONES = ("smallcnn", "minixception")


@pytest.fixture(scope="module")
def tiny_study(prepared_data, tmp_path_factory):
    """A study folder with best/<backbone>/ for two backbones (1 epoch each, test evaluated) and a
    study.json naming them: what `run` leaves, without Ray."""
    folder = tmp_path_factory.mktemp("ensemble") / "results" / "tiny"
    for backbone in BACKBONES:
        run_trial(
            dict(
                backbone=backbone,
                image_size=32,
                weights="none",
                dense_units=16,
                batch_size=16,
                epochs_head=0,
                epochs_finetune=1,
                unfreeze_layers=200,
                lr_finetune=3e-3,
            ),
            prepared_data,
            folder / "best" / backbone,
            evaluate_test=True,
        )
    study = {"status": "completed", "space": {"backbones": list(BACKBONES), "metric": "val_loss"}}
    (folder / "study.json").write_text(json.dumps(study))
    return folder


def _by_hand(folder) -> tuple[pd.DataFrame, np.ndarray, list[str], dict[str, pd.DataFrame]]:
    """(the test images with labels, the mean probabilities, classes, each member's table)."""
    tables = {b: pd.read_csv(folder / "best" / b / "test_predictions.csv") for b in BACKBONES}
    classes = json.loads((folder / "best" / BACKBONES[0] / "test_metrics.json").read_text())[
        "classes"
    ]
    columns = [f"p_{c}" for c in classes]
    first = tables[BACKBONES[0]]
    assert all((t["path"] == first["path"]).all() for t in tables.values())  # same images, order
    probs = np.mean([t[columns].to_numpy() for t in tables.values()], axis=0)
    return first[["path", "label"]], probs, classes, tables


def test_the_ensemble_row_is_the_mean_of_the_stored_probabilities(tiny_study, tmp_path):
    images, probs, classes, tables = _by_hand(tiny_study)
    labels = images["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    expected = classification_metrics(labels, probs, classes, seed=0)
    predicted = np.asarray(classes)[probs.argmax(axis=1)]
    assert expected["accuracy"]["value"] == pytest.approx(np.mean(predicted == images["label"]))

    out = build_report(tiny_study, tmp_path / "report", gradcam_per_class=0)
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["backbone"]) == [*BACKBONES, "ensemble of 2"]
    row = table.iloc[-1]
    assert row["status"] == "ensemble" and row["n_test"] == len(images)
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert row[key] == pytest.approx(expected[key]["value"])
        assert [row[f"{key}_lo"], row[f"{key}_hi"]] == pytest.approx(expected[key]["ci95"])
    params = [json.loads((tiny_study / "best" / b / "summary.json").read_text()) for b in BACKBONES]
    assert row["params"] == sum(p["params"] for p in params)
    markdown = (out / "report.md").read_text()
    accuracy = expected["accuracy"]
    lo, hi = accuracy["ci95"]
    assert f"| ensemble of 2 | {accuracy['value']:.3f} [{lo:.3f}, {hi:.3f}] |" in markdown

    # the paired comparisons against each member, as compare_paired gives them by hand
    verdict = build_verdict(load_study(tiny_study))["ensemble"]
    assert verdict["members"] == list(BACKBONES) and verdict["n"] == len(images)
    for pair in verdict["pairs"]:
        member = tables[pair["b"]]["predicted"]
        by_hand = compare_paired(images["label"], predicted, member)
        assert pair["a"] == "ensemble of 2"
        assert {k: pair[k] for k in by_hand} == pytest.approx(by_hand)
    verdict_text = markdown[markdown.index("## Verdict") : markdown.index("## Data audit")]
    for member in BACKBONES:
        assert f"ensemble of 2 vs {member}: " in verdict_text
    assert "selects nothing on the test split" in verdict_text


def test_no_ensemble_of_one_model_or_without_probabilities(tiny_study, tmp_path):
    import shutil

    one = tmp_path / "one"
    shutil.copytree(tiny_study, one)
    shutil.rmtree(one / "best" / BACKBONES[1])
    assert load_study(one).ensemble is None
    bare = tmp_path / "bare"
    shutil.copytree(tiny_study, bare)
    path = bare / "best" / BACKBONES[1] / "test_predictions.csv"
    pd.read_csv(path)[["path", "label", "predicted"]].to_csv(path, index=False)  # no p_ columns
    study = load_study(bare)
    assert study.ensemble is None and build_verdict(study)["ensemble"] is None
