"""Warm workers (issue 12, part 1): with `run --reuse-workers` a trial slot keeps its worker process
between trials; a trial run there after others (one that raised, one with a NaN loss) repeats, epoch
for epoch, the same config run first in a fresh process."""

import json

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

COMPARED = ("loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr")


def test_a_reused_worker_repeats_a_fresh_process_after_failed_trials(
    new_study, tmp_path, run_study_cli
):
    """One slot (1 CPU), four trials in this order: A (fresh process), one whose weights file does
    not exist (raises), one reporting a NaN loss (test-only hook FER_TEST_NAN_DROPOUT), then A's
    config again."""
    folder = new_study("reuse")
    bad = str(tmp_path / "no-such.weights.h5")
    good = {"dropout": 0.3, "weights": "none"}
    space = {
        "name": "reuse",
        "backbones": ["smallcnn"],
        "trials_per_backbone": 4,
        "scheduler": {"type": "none"},
        "fixed": {
            "image_size": 32,
            "dense_units": 16,
            "batch_size": 16,
            "epochs_head": 1,
            "epochs_finetune": 2,
            "augment": 0.0,
        },
        "space": {"dropout": {"uniform": [0.1, 0.6]}, "weights": {"choice": ["none", bad]}},
        "start_points": [
            good,
            {"dropout": 0.5, "weights": bad},
            {"dropout": 0.45, "weights": "none"},
            good,
        ],
    }
    space_file = tmp_path / "reuse.yaml"
    space_file.write_text(yaml.safe_dump(space))
    proc = run_study_cli(
        folder, space_file, "--reuse-workers", num_cpus=1, env={"FER_TEST_NAN_DROPOUT": "0.45"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcomes = sorted(
        (
            {**json.loads(p.read_text()), "folder": p.parent}
            for p in (folder / "trials").glob("*/outcome.json")
        ),
        key=lambda o: o["finished_at"],
    )
    assert [o["status"] for o in outcomes] == ["completed", "errored", "errored", "completed"]
    assert "weights file not found" in outcomes[1]["error"] and "nan" in outcomes[2]["error"]
    assert len({o["worker_pid"] for o in outcomes}) == 1, [
        o["worker_pid"] for o in outcomes
    ]  # one process
    first, last = outcomes[0], outcomes[3]
    assert (
        first["config"] == {**last["config"]} and len(first["history"]) == len(last["history"]) == 3
    )
    for a, b in zip(first["history"], last["history"], strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-6, rel=0), (key, a["epoch"])
    # the warm trial restored the model the worker kept (built the same) instead of building one
    summary = {
        o["folder"].name: json.loads((o["folder"] / "summary.json").read_text())
        for o in (first, last)
    }
    assert summary[first["folder"].name]["model_reused"] is False
    assert summary[last["folder"].name]["model_reused"] is True
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4
