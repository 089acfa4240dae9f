"""The study folder's trial bookkeeping: one `outcome.json` per finished trial, and `trials.csv`
(study.json is study.tune.record's).

`trials/<trial_id>/outcome.json` is written by the driver the moment a trial ends (completed,
stopped early by the scheduler, or errored with its message); `trials.csv` is rebuilt from all
outcomes right after. Times per trial: `train_s` is the sum of its epoch times (first-step graph
compilation included), `trial_s` its wall time in the worker up to its last report (process
start-up, imports, model build included).

These files are the study's memory: a resumed study counts what is already done from them, so no
finished trial is repeated or lost, whatever moment the driver was killed at. Writes are atomic
(temp file + rename), so a kill never leaves half a file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd

from fer.core import names
from fer.core.config import PARAMS
from fer.core.files import atomic_write_text, write_json

OUTCOME = names.OUTCOME_FILE
LEAD_COLUMNS = (
    "trial_id",
    "backbone",
    "status",
    "error",
    "metric",
    "metric_value",
    "best_epoch",
    "best_val_loss",
    "best_val_accuracy",
    "best_val_macro_f1",
    "epochs_run",
    "train_s",
    "trial_s",
    "images_per_s",
    "optuna_trial",
    "retries",
    "node_ip",
    "finished_at",
    "trial_dir",
)


def clean_float(value):
    """A JSON/CSV-friendly number: None for missing or non-finite values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class Ledger:
    """Finished trials of one study folder, read from and written to `trials/*/outcome.json`."""

    def __init__(self, study_dir: Path):
        self.study_dir = Path(study_dir)
        self.trials_dir = self.study_dir / names.TRIALS_DIR
        self.outcomes: dict[str, dict] = {}
        if self.trials_dir.is_dir():
            for path in sorted(self.trials_dir.glob(f"*/{OUTCOME}")):
                outcome = json.loads(path.read_text())
                self.outcomes[outcome["trial_id"]] = outcome

    def finished_per_backbone(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome["backbone"]] = counts.get(outcome["backbone"], 0) + 1
        return counts

    def status_counts(self) -> dict[str, int]:
        """Finished trials by status (study.json's `trials`)."""
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome["status"]] = counts.get(outcome["status"], 0) + 1
        return counts

    def discard_unfinished_folders(self) -> list[str]:
        """Remove trial folders a killed run left without an outcome (partial outputs we wrote
        ourselves)."""
        removed = []
        if self.trials_dir.is_dir():
            for folder in sorted(p for p in self.trials_dir.iterdir() if p.is_dir()):
                if not (folder / OUTCOME).exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
        return removed

    def record(self, outcome: dict) -> None:
        """Store one finished trial and rewrite trials.csv."""
        write_json(self.trials_dir / outcome["trial_id"] / OUTCOME, outcome)
        self.outcomes[outcome["trial_id"]] = outcome
        self.write_csv()

    def table(self) -> pd.DataFrame:
        rows = []
        for outcome in sorted(
            self.outcomes.values(), key=lambda o: (o.get("finished_at") or 0, o["trial_id"])
        ):
            row = {key: outcome.get(key) for key in LEAD_COLUMNS}
            # outcomes written before retries existed: none
            row["retries"] = outcome.get("retries", 0)
            for key in PARAMS:
                if key != "backbone":
                    row[key] = (outcome.get("config") or {}).get(key)
            rows.append(row)
        columns = list(LEAD_COLUMNS) + [key for key in PARAMS if key != "backbone"]
        return pd.DataFrame(rows, columns=columns)

    def write_csv(self) -> None:
        atomic_write_text(self.study_dir / names.TRIALS_CSV, self.table().to_csv(index=False))

    def best(self, backbone: str, metric: str, mode: str) -> dict | None:
        """The backbone's best finished trial by `metric` (completed or stopped early, finite
        value)."""
        candidates = [
            o
            for o in self.outcomes.values()
            if o["backbone"] == backbone
            and o["status"] in names.FINISHED_OK
            and clean_float(o.get("metric_value")) is not None
        ]
        if not candidates:
            return None
        sign = 1.0 if mode == "min" else -1.0
        return min(candidates, key=lambda o: (sign * o["metric_value"], o.get("finished_at") or 0))


def summarize_history(records: list[dict], metric: str, mode: str) -> dict:
    """Best-epoch metrics, epochs run, training time and speed from a trial's per-epoch records."""
    finite = [r for r in records if clean_float(r.get(metric)) is not None]
    out = {
        "metric": metric,
        "metric_value": None,
        "best_epoch": None,
        "best_val_loss": None,
        "best_val_accuracy": None,
        "best_val_macro_f1": None,
        "epochs_run": max((int(r.get("epoch", 0)) for r in records), default=0),
        "train_s": round(sum(clean_float(r.get("epoch_s")) or 0.0 for r in records), 3),
        "trial_s": max((clean_float(r.get("trial_s")) or 0.0 for r in records), default=None),
        "images_per_s": None,
    }
    speeds = [clean_float(r.get("images_per_s")) for r in records]
    speeds = [s for s in speeds if s is not None]
    if speeds:
        out["images_per_s"] = round(sum(speeds) / len(speeds), 3)
    if finite:
        sign = 1.0 if mode == "min" else -1.0
        best = min(finite, key=lambda r: sign * r[metric])
        out.update(
            metric_value=float(best[metric]),
            best_epoch=int(best.get("epoch", 0)),
            best_val_loss=clean_float(best.get("val_loss")),
            best_val_accuracy=clean_float(best.get("val_accuracy")),
            best_val_macro_f1=clean_float(best.get("val_macro_f1")),
        )
    return out
