"""`run --naive-split`: the notebook's split leaks subjects and duplicates, the audited one does
not; the retraining runs end to end on the demo data and its result reaches the report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from study.tune.naive_split import leaked_share, read_manifest, resplit


def test_naive_split_leaks_and_audited_split_does_not(study_base):
    data = study_base / "data"
    meta = json.loads((data / "study_data.json").read_text())
    manifest, classes = read_manifest(data), meta["classes"]
    audited = resplit(manifest, classes, "audited", meta["seed"], meta["split"])
    assert (audited.split != "excluded").sum() == (
        manifest.split != "excluded"
    ).sum()  # the usable files
    assert leaked_share(audited) == 0.0
    naive_shares = []
    for seed in range(3):
        naive = resplit(manifest, classes, "naive", seed, meta["split"])
        used = naive[naive.split != "excluded"]
        assert (
            used.status == "duplicate"
        ).any()  # duplicates prepare set aside are back, as in a notebook
        assert len(used) > (manifest.split != "excluded").sum()
        assert set(used.label) == set(classes) and set(used.split) == {"train", "val", "test"}
        naive_shares.append(leaked_share(naive))
        other = resplit(manifest, classes, "audited", seed + 1, meta["split"])
        assert leaked_share(other) == 0.0  # whatever the seed
    assert min(naive_shares) > 0.5  # with 6 subjects, most test faces have their subject in train
    tests = {
        tuple(
            sorted(
                set(
                    resplit(manifest, classes, "audited", s, meta["split"])
                    .query("split == 'test'")
                    .group
                )
            )
        )
        for s in range(5)
    }
    assert len(tests) >= 3  # the seeds draw different people for test
    with pytest.raises(Exception, match="every class needs images"):
        resplit(
            manifest[manifest.label != classes[0]].assign(split="excluded"),
            classes,
            "naive",
            0,
            meta["split"],
        )


@pytest.mark.slow
def test_run_naive_split_end_to_end(new_study, tmp_path, run_study_cli):
    folder = new_study("naive")
    space = {
        "name": "naive",
        "backbones": ["smallcnn"],
        "trials_per_backbone": 1,
        "scheduler": "none",
        "fixed": {
            "image_size": 32,
            "weights": "none",
            "dense_units": 16,
            "batch_size": 16,
            "epochs_head": 1,
            "epochs_finetune": 1,
            "augment": 0.0,
            "unfreeze_layers": 200,
        },
    }
    space_file = tmp_path / "naive.yaml"
    space_file.write_text(yaml.safe_dump(space))
    proc = run_study_cli(folder, space_file, "--naive-split", 2, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((folder / "naive_split.json").read_text())
    stats = result["backbones"]["smallcnn"]
    for kind in ("naive", "audited"):
        assert stats[kind]["n"] == 2 and 0.0 <= stats[kind]["mean"] <= 1.0
        for run in stats["runs"][kind].values():
            assert run["n"]["test"] > 0
    assert (
        stats["naive"]["test_groups_in_train"] > 0.5
        and stats["audited"]["test_groups_in_train"] == 0.0
    )
    seeds = stats["runs"]["naive"]
    expected = [
        seeds[s]["test_accuracy"] - stats["runs"]["audited"][s]["test_accuracy"] for s in seeds
    ]
    assert stats["gap"]["n"] == 2 and stats["gap"]["mean"] == pytest.approx(sum(expected) / 2)
    assert "naive split: smallcnn: test accuracy naive" in proc.stdout
    study = json.loads((folder / "study.json").read_text())
    assert "naive_split_s" in study["timings"]

    from study.report import build_report

    out = build_report(folder, tmp_path / "report", gradcam_per_class=0)
    text = (out / "report.md").read_text()
    assert "Naive vs audited split" in text and "gap naive - audited" in text

    again = run_study_cli(folder, space_file, "--naive-split", 1, "--resume", timeout=120)
    assert again.returncode == 2 and "at least 2 split seeds" in again.stderr
    assert pd.read_csv(folder / "trials.csv").shape[0] == 1
