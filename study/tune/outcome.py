"""What the driver knows of a trial beyond its epochs, for its outcome.json: the attempt it saw
(`Attempt`: a retried trial starts a new one), why a trial's worker died (`error_message`) and
where the trial's wall time went (`trial_timing`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ray.exceptions import RayError

from fer.core import names
from study.tune.ledger import clean_float


@dataclasses.dataclass
class Attempt:
    """What the driver saw of a trial's current attempt, from Tune's events and its reports."""

    started_at: float | None = None  # driver time Tune started the trial's actor
    records: list[dict] = dataclasses.field(default_factory=list)  # one per epoch report
    worker_started_at: float | None = None  # the trial function's first line (worker clock)
    node_ip: str | None = None
    pid: int | None = None  # the worker process (a warm worker runs several trials)


def error_message(trial) -> str:
    """The one-line cause of an errored trial (the original exception, not Ray's wrapper).

    Read from the trial's local error files, which Tune writes before calling `on_trial_error`.
    """
    cause = _pickled_error(trial)
    for _ in range(5):  # TuneError -> RayTaskError -> the trial's own exception
        inner = getattr(cause, "cause", None)
        if inner is None or inner is cause:
            break
        cause = inner
    if cause is not None and not isinstance(cause, RayError):
        return f"{type(cause).__name__}: {cause}".replace("\n", " ")[:500]
    text = str(cause) if cause is not None else ""
    if not text and trial.error_file and Path(trial.error_file).exists():
        text = Path(trial.error_file).read_text()
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Failure #")
    ]
    return (lines[-1] if lines else "unknown error (see the trial's error.txt)")[:500]


def _pickled_error(trial):
    import cloudpickle

    try:
        if trial.pickled_error_file and Path(trial.pickled_error_file).exists():
            with open(trial.pickled_error_file, "rb") as fh:
                return cloudpickle.load(fh)
    except Exception:  # noqa: BLE001 - an unreadable error file must not crash the driver
        return None
    return None


def trial_timing(attempt: Attempt, trial_dir: Path, finished_at: float) -> dict:
    """Where a trial's wall time went, as unix times and the seconds between them (outcome.json
    "timing").

    started_at (driver: Tune started the trial's actor) -> worker_started_at (the trial function's
    first line) -> first_epoch_at (the first epoch began) -> last_report_at -> worker_finished_at
    (the trial function returned; missing if a scheduler stopped it at its last report) ->
    finished_at (driver: outcome written).
    """
    worker = _worker_times(trial_dir)
    times = {
        "started_at": attempt.started_at,
        "worker_started_at": attempt.worker_started_at,
        **_report_times(attempt.records),
        "worker_finished_at": worker.get("finished_at"),
        "finished_at": finished_at,
    }
    out = {key: (round(value, 3) if value is not None else None) for key, value in times.items()}
    out.update(_durations(times, attempt.records, worker))
    return out


def _worker_times(trial_dir: Path) -> dict:
    """worker_times.json, written by the trial function when it returns (study.tune.trainable)."""
    try:
        return json.loads((Path(trial_dir) / names.WORKER_TIMES_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _report_times(records: list[dict]) -> dict:
    """When the first epoch began (its report's time less its duration) and the last report came."""
    reported = [r for r in records if clean_float(r.get("reported_at")) is not None]
    if not reported:
        return {"first_epoch_at": None, "last_report_at": None}
    first_epoch_s = clean_float(reported[0].get("epoch_s")) or 0.0
    return {
        "first_epoch_at": reported[0]["reported_at"] - first_epoch_s,
        "last_report_at": reported[-1]["reported_at"],
    }


def _durations(times: dict, records: list[dict], worker: dict) -> dict:
    """The seconds between the moments in `times` (None where either end is missing)."""

    def between(a, b):
        if times[a] is None or times[b] is None:
            return None
        return round(times[b] - times[a], 3)

    epochs_s = sum(clean_float(r.get("epoch_s")) or 0.0 for r in records)
    span = between("first_epoch_at", "last_report_at")
    worker_finished = times["worker_finished_at"] is not None
    return {
        # the worker process and the Tune actor already exist at started_at (on_trial_start comes
        # when the actor is ready): their start-up is in the slot's gap before started_at
        "worker_start_s": between("started_at", "worker_started_at"),
        "setup_s": between("worker_started_at", "first_epoch_at"),  # imports, data, model build
        "epochs_s": round(epochs_s, 3),
        # saves, reports
        "between_epochs_s": round(span - epochs_s, 3) if span is not None else None,
        # of which blocked in tune.report (driver round trips)
        "report_wait_s": worker.get("report_wait_s"),
        "wrap_up_s": between("last_report_at", "worker_finished_at"),  # final val metrics, summary
        # the driver learns the trial ended
        "end_s": between("worker_finished_at", "finished_at")
        if worker_finished
        else between("last_report_at", "finished_at"),
    }
