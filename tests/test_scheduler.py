"""The per-backbone ASHA scheduler judges trials only where every searched parameter has acted: its
rungs count fine-tune epochs for two-stage backbones, the global epoch for one-stage training, never
fall on a trial's last epoch, and each trial saves its best model before exactly those reports."""

import json

import pandas as pd
import pytest
import yaml

from study.space import parse_space
from study.tune.options import TrialContext
from study.tune.search import PerBackboneScheduler
from study.tune.trainable import EpochReporter, report_can_stop

GRACE = 2


def _space(**changes) -> dict:
    raw = {
        "name": "sched",
        "metric": "val_loss",
        "mode": "min",
        "backbones": ["mobilenet025"],
        "trials_per_backbone": 6,
        # reduction factor 3: a trial continues only in its rung's top third, so some trials stop
        "scheduler": {"type": "asha", "grace_period": GRACE, "reduction_factor": 3},
        "fixed": {
            "image_size": 32,
            "weights": "none",
            "dense_units": 16,
            "batch_size": 16,
            "epochs_head": 3,  # longer than the grace period
            "epochs_finetune": 3,  # one rung: fine-tune epoch 2
            "patience": 40,
            "augment": 0.0,
        },
        "space": {
            "dropout": {"uniform": [0.0, 0.6]},
            "lr_finetune": {"loguniform": [1.0e-5, 3.0e-2]},
        },
    }
    raw.update(changes)
    return raw


def _can_stop(points: dict, backbone: str, reporter: EpochReporter):
    context = TrialContext("d", "t", "l", 1, "val_loss", decision_epochs=points)
    return report_can_stop({"backbone": backbone}, context, reporter)


def test_rungs_count_fine_tune_epochs_and_never_fall_on_the_last_epoch():
    own = {"mobilenetv2": {"epochs_head": 5, "epochs_finetune": 0}}  # one stage: global epochs
    two_stages = {**_space()["fixed"], "epochs_finetune": 4}
    space = parse_space(
        _space(
            backbones=["mobilenet025", "mobilenetv2"],
            fixed=two_stages,
            per_backbone=own,
            scheduler={"type": "asha", "grace_period": GRACE, "reduction_factor": 2},
        )
    )
    points = PerBackboneScheduler(space).decision_epochs()
    # fine-tune epochs 2 and 4 would be rungs, but 4 is the last fine-tune epoch
    assert points["mobilenet025"] == ("finetune_epoch", (2,))
    assert points["mobilenetv2"] == ("epoch", (2, 4))  # 5 head epochs: rungs at 2, 4 (not 5)
    assert space.warnings() == []


def test_a_decision_point_is_translated_into_each_trial_s_own_epochs():
    reporter = EpochReporter(0.0, 0.0)
    can_stop = _can_stop({"mobilenet025": ("finetune_epoch", (2, 6))}, "mobilenet025", reporter)
    saves = []
    stages = ["head"] * 3 + ["finetune"] * 6
    for epoch, stage in enumerate(stages, start=1):
        if can_stop(epoch):  # asked before the epoch's report, as fer.train.epoch_monitor does
            saves.append(epoch)
        reporter.head_epochs += stage == "head"  # what the report then counts
    assert saves == [5, 9]  # fine-tune epochs 2 and 6 after a 3-epoch head stage

    early = EpochReporter(0.0, 0.0)  # a head stage that early stopping ended after 2 epochs
    can_stop = _can_stop({"mobilenet025": ("finetune_epoch", (2,))}, "mobilenet025", early)
    early.head_epochs = 2
    assert [e for e in range(3, 8) if can_stop(e)] == [4]

    one_stage = _can_stop({"smallcnn": ("epoch", (4, 12))}, "smallcnn", EpochReporter(0.0, 0.0))
    assert [e for e in range(1, 20) if one_stage(e)] == [4, 12]
    no_scheduler = _can_stop({}, "smallcnn", EpochReporter(0.0, 0.0))
    assert not any(no_scheduler(e) for e in range(1, 20))


@pytest.mark.slow
def test_no_trial_is_stopped_before_its_fine_tuning_ran_the_grace_period(
    new_study, run_study_cli, tmp_path
):
    """A real study whose head stage (3 epochs) is longer than the grace period (2): every trial
    ASHA stops has fine-tuned for at least the grace period, and holds the best model of the
    epochs it ran (saved before the rung's report, where the trial was stopped)."""
    folder = new_study("sched")
    space_file = tmp_path / "sched.yaml"
    space_file.write_text(yaml.safe_dump(_space()))
    proc = run_study_cli(folder, space_file)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "head stage" not in proc.stdout + proc.stderr  # no head-stage warning
    rows = pd.read_csv(folder / "trials.csv")
    assert len(rows) == 6
    stopped = rows[rows.status == "stopped"]
    assert len(stopped) >= 1, rows[["trial_id", "status", "metric_value"]]
    for trial_id in stopped.trial_id:
        trial_dir = folder / "trials" / trial_id
        outcome = json.loads((trial_dir / "outcome.json").read_text())
        finetuned = [r for r in outcome["history"] if r["stage"] == "finetune"]
        assert len(finetuned) >= GRACE, outcome["history"]
        assert (trial_dir / "model.keras").is_file()
    for trial_id in rows.trial_id:  # every trial ran its whole head stage
        outcome = json.loads((folder / "trials" / trial_id / "outcome.json").read_text())
        assert [r["stage"] for r in outcome["history"]][:3] == ["head"] * 3
