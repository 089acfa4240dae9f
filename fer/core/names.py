"""Names shared across the pipeline: result files, per-epoch record keys, trial and study statuses,
Optuna study naming, and the one test of "is this a study folder".

Writers (fer.train.trial, study.tune) and readers (study.report, fer.evaluate.predict, the tests)
take them from here, so a file or key is renamed in one place. The layout they describe is
documented in docs/results.md. No imports beyond the standard library: both `fer/` and `study/`
import this module.
"""

from __future__ import annotations

from pathlib import Path

# ---- one trial's folder (fer.train.trial.run_trial)
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
MODEL_FILE = "model.keras"
VAL_METRICS_FILE = "val_metrics.json"
SUMMARY_FILE = "summary.json"
TRIAL_FILES = (CONFIG_FILE, MODEL_FILE, HISTORY_FILE, VAL_METRICS_FILE, SUMMARY_FILE)


def metrics_file(split: str) -> str:
    """`<split>_metrics.json` (val_metrics.json, test_metrics.json)."""
    return f"{split}_metrics.json"


def predictions_file(split: str) -> str:
    """`<split>_predictions.csv` (test_predictions.csv)."""
    return f"{split}_predictions.csv"


TEST_METRICS_FILE = metrics_file("test")
TEST_PREDICTIONS_FILE = predictions_file("test")

# The per-epoch record (history.csv columns, `on_epoch` argument, what each trial reports to Ray
# Tune).
RECORD_KEYS = (
    "epoch",
    "stage",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "lr",
    "epoch_s",
    "images_per_s",
)

# ---- a study folder: results/<study>/ (study.tune writes it, study.report reads it)
STUDY_FILE = "study.json"
TRIALS_CSV = "trials.csv"
TRIALS_DIR = "trials"
# trials/<trial_id>/collapse.json: collapsed epochs per stage (fer.train.collapse)
COLLAPSE_FILE = "collapse.json"
OUTCOME_FILE = "outcome.json"  # trials/<trial_id>/outcome.json
WORKER_TIMES_FILE = "worker_times.json"  # trials/<trial_id>/worker_times.json
# trials/<trial_id>/error.txt: the traceback of a trial that raised (status errored)
ERROR_FILE = "error.txt"
# with storage: a trial's progress lines (the driver appends them to study.log)
TRIAL_LOG_FILE = "progress.log"
# The key of a trial's last report when our code raised in it (the one-line error): the trial then
# ends normally, so Ray Tune's retry (kept for dead workers) never repeats it (docs/results.md,
# INTERNALS.md).
TRIAL_ERROR_KEY = "trial_error"
BEST_DIR = "best"
SELECTION_FILE = "selection.json"  # best/<backbone>/selection.json
LATENCY_FILE = (
    "latency.json"  # best/<backbone>/latency.json: deployment figures (fer.deploy.latency)
)
EXPORT_FILE = "export.json"  # next to an exported model (fer.deploy.export)
SEEDS_FILE = "seeds.json"  # best/<backbone>/seeds.json (final_seeds)
OPTUNA_FILE = "optuna.sqlite3"
NAIVE_SPLIT_FILE = "naive_split.json"  # run --naive-split: naive vs audited split test accuracies
STUDY_LOG = "study.log"  # progress lines of long one-off steps in trials (feature and pixel caches)
DATA_DIR = "data"  # the prepared data (fer.prepare.prepare_dataset)
STUDY_DATA_FILE = (
    "study_data.json"  # data/study_data.json: written with the rest of a finished preparation
)
AUDIT_FILE = "audit.json"  # data/audit.json
MANIFEST_FILE = "manifest.csv"  # data/manifest.csv
DUPLICATES_SHEET = (
    "duplicates_sheet.png"  # data/duplicates_sheet.png: sampled excluded pairs and label conflicts
)
EVALUATIONS_DIR = "evaluations"  # evaluations/<backbone>__<dataset>.json (fer-study evaluate)

# Trial statuses in trials.csv / outcome.json: stopped = early-stopped by the scheduler (ASHA).
COMPLETED, STOPPED, ERRORED = "completed", "stopped", "errored"
TRIAL_STATUSES = (COMPLETED, STOPPED, ERRORED)
FINISHED_OK = (COMPLETED, STOPPED)  # statuses whose metric counts when picking the best trial
# study.json "status".
STUDY_RUNNING, STUDY_INTERRUPTED, STUDY_COMPLETED, STUDY_FAILED = (
    "running",
    "interrupted",
    "completed",
    "failed",
)


def optuna_study_name(space_name: str, backbone: str) -> str:
    """The Optuna study of one backbone in optuna.sqlite3: `<space name>-<backbone>`."""
    return f"{space_name}-{backbone}"


def is_prepared_data(folder: str | Path) -> bool:
    """True for a finished `prepare` output (a study's data/ folder): a preparation is published
    whole."""
    return (Path(folder) / STUDY_DATA_FILE).is_file()


def is_study_folder(path: str | Path) -> bool:
    """True for a study folder, results/<study>/: one holding prepared data (`prepare --study`,
    `run`, `train`)."""
    return is_prepared_data(Path(path) / DATA_DIR)


def has_study_results(path: str | Path) -> bool:
    """True for a study folder that `fer-study run` has written to (study.json is its first write;
    trials.csv follows): what `report` and `evaluate` need."""
    path = Path(path)
    return (path / STUDY_FILE).is_file() or (path / TRIALS_CSV).is_file()
