"""Collapsed training stages: a stage whose model ends up giving (nearly) the same answer for every
image.

Why: a too-high fine-tuning learning rate can wreck a pretrained network in one epoch (uniform
outputs, loss ln K). Early stopping then keeps the head stage's model, so the trial looks merely
mediocre and nothing says why.
Every epoch's validation predictions are checked here; a collapsed epoch is written at once to the
trial folder's `collapse.json` (so a trial a scheduler stops is recorded too), a stage that ENDS
collapsed is logged as a warning, and the trial's summary.json lists the stages under
`collapsed_stages`.

An epoch is collapsed when its validation outputs are nearly uniform (mean top probability below 1/K
+ UNIFORM_MARGIN) or one class takes at least ONE_CLASS_SHARE of the predictions.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from fer.core.files import write_json
from fer.core.names import COLLAPSE_FILE

log = logging.getLogger(__name__)

UNIFORM_MARGIN = 0.02
ONE_CLASS_SHARE = 0.95


def collapse_reason(
    probs: np.ndarray, num_classes: int, classes: list[str] | None = None
) -> str | None:
    """Why these predictions (N x K probabilities) are collapsed, or None when they are not."""
    if len(probs) == 0 or num_classes < 2:
        return None
    top = float(np.mean(np.max(probs, axis=1)))
    if top < 1.0 / num_classes + UNIFORM_MARGIN:
        return f"uniform outputs (mean top probability {top:.3f}, 1/K = {1.0 / num_classes:.3f})"
    counts = np.bincount(np.argmax(probs, axis=1), minlength=num_classes)
    share = float(counts.max() / counts.sum())
    if share >= ONE_CLASS_SHARE:
        name = classes[int(counts.argmax())] if classes else str(int(counts.argmax()))
        return f"one class predicted ({share:.0%} of val images are '{name}')"
    return None


class CollapseLog:
    """The collapsed epochs of one trial, per stage; written to `out_dir/collapse.json` when there
    are any."""

    def __init__(self, out_dir: Path, config: dict, num_classes: int):
        self.path = Path(out_dir) / COLLAPSE_FILE
        self.config, self.num_classes = config, num_classes
        self.epochs: dict[str, list[dict]] = {}  # stage -> collapsed epoch records
        self.path.unlink(missing_ok=True)  # a rerun in the same folder starts clean

    def check(
        self, stage: str, record: dict, probs: np.ndarray, classes: list[str] | None = None
    ) -> None:
        """Check one epoch's validation predictions; record and write the file if they are
        collapsed."""
        reason = collapse_reason(probs, self.num_classes, classes)
        if reason is None:
            return
        self.epochs.setdefault(stage, []).append(
            {
                "epoch": record["epoch"],
                "reason": reason,
                "loss": record.get("loss"),
                "val_loss": record.get("val_loss"),
                "val_accuracy": record.get("val_accuracy"),
            }
        )
        self.write(last_epoch={stage: record["epoch"]})

    def stages(self, last_epoch: dict[str, int]) -> list[dict]:
        """One entry per stage with collapsed epochs; `ended_collapsed`: its last epoch (so far) was
        one."""
        out = []
        lr_key = {"head": "lr_head", "finetune": "lr_finetune"}
        for stage, epochs in self.epochs.items():
            entry = {
                "stage": stage,
                "ended_collapsed": epochs[-1]["epoch"] == last_epoch.get(stage),
                "collapsed_epochs": [e["epoch"] for e in epochs],
                "reason": epochs[-1]["reason"],
                "loss": epochs[-1]["loss"],
                "ln_k": math.log(self.num_classes),
                "val_accuracy": epochs[-1]["val_accuracy"],
            }
            if stage in lr_key:  # the hyperparameters that did it
                entry[lr_key[stage]] = self.config.get(lr_key[stage])
            if stage == "finetune":
                entry["unfreeze_layers"] = self.config.get("unfreeze_layers")
            out.append(entry)
        return out

    def write(self, last_epoch: dict[str, int]) -> list[dict]:
        stages = self.stages(last_epoch)
        if stages:
            write_json(self.path, {"collapsed_stages": stages})
        return stages

    def stage_ended(self, stage: str, last_epoch: int | None) -> None:
        """Log a warning when `stage` ended on a collapsed epoch."""
        epochs = self.epochs.get(stage, [])
        if last_epoch is None or not epochs or epochs[-1]["epoch"] != last_epoch:
            return
        lr_key = "lr_head" if stage == "head" else "lr_finetune"
        log.warning(
            "%s: the %s stage collapsed (%s at its last epoch %d, "
            "train loss %s vs ln K %.3f; %s=%s)%s",
            self.config.get("backbone"),
            stage,
            epochs[-1]["reason"],
            last_epoch,
            _num(epochs[-1]["loss"]),
            math.log(self.num_classes),
            lr_key,
            self.config.get(lr_key),
            "; try a lower lr_finetune" if stage == "finetune" else "",
        )


def _num(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def read_collapsed_epochs(trial_dir: Path) -> dict[tuple[str, int], str]:
    """The collapsed epochs a trial recorded, {(stage, epoch): reason}; empty when none (no
    collapse.json). The report's verdict reads this rather than judging histories again, so
    training's warning and the report's flag follow one definition (`collapse_reason`)."""
    try:
        record = json.loads((Path(trial_dir) / COLLAPSE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for entry in record.get("collapsed_stages") or []:
        for epoch in entry.get("collapsed_epochs") or []:
            out[(str(entry.get("stage")), int(epoch))] = str(entry.get("reason"))
    return out
