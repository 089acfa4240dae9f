"""The driver side of a running study: record each trial as it ends, and show one line per trial.

`StudyCallback` is a Ray Tune callback (it runs in the driver process): it keeps each trial's
per-epoch results, writes the trial's outcome (trials/<id>/outcome.json, trials.csv) the moment it
ends, and feeds `ProgressView`. On a terminal the view redraws one live line per running trial under
the finished ones; elsewhere (CI logs, files) it prints a line when a trial starts and when it ends.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ray.exceptions import RayError
from ray.tune import Callback

from fer.core import names
from study.tune.ledger import Ledger, clean_float, summarize_history


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_line(
    tid: str,
    backbone: str,
    state: str,
    record: dict | None,
    metric: str,
    params: dict,
    error: str | None = None,
) -> str:
    record = record or {}
    value = clean_float(record.get(metric))
    parts = [
        f"{tid:<12}",
        f"{backbone:<14}",
        f"{state:<9}",
        f"epoch {int(record.get('epoch', 0)):>3}",
        f"{metric} {value:.4f}" if value is not None else f"{metric} -     ",
        " ".join(f"{k}={_fmt(v)}" for k, v in params.items()),
    ]
    line = "  ".join(parts)
    if error:
        line += f"  ERROR: {error}"
    return line


class ProgressView:
    """One line per trial: finished trials scroll up, running ones are redrawn in place on a
    terminal."""

    def __init__(
        self, total: int, metric: str, stream: TextIO | None = None, live: bool | None = None
    ):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.total, self.metric = total, metric
        self.running: dict[str, str] = {}
        self.done = dict.fromkeys(names.TRIAL_STATUSES, 0)
        self._drawn = 0
        self._last_draw = 0.0

    def __getstate__(
        self,
    ):  # Tune pickles its callbacks with the experiment; a stream cannot be pickled
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state):
        self.__dict__.update(state, stream=sys.stdout)

    def _summary(self) -> str:
        finished = sum(self.done.values())
        return (
            f"[{finished}/{self.total} trials] running {len(self.running)}, completed "
            f"{self.done[names.COMPLETED]}, stopped early {self.done[names.STOPPED]}, "
            f"errored {self.done[names.ERRORED]}"
        )

    def _redraw(self, permanent: list[str] = ()) -> None:
        out = []
        if self.live and self._drawn:
            out.append(f"\x1b[{self._drawn}F\x1b[J")
        out.extend(line + "\n" for line in permanent)
        if self.live:
            block = list(self.running.values()) + [self._summary()]
            out.extend(line + "\n" for line in block)
            self._drawn = len(block)
        self.stream.write("".join(out))
        self.stream.flush()

    def started(self, tid: str, line: str) -> None:
        self.running[tid] = line
        self._redraw([] if self.live else [line])

    def update(self, tid: str, line: str) -> None:
        self.running[tid] = line
        if self.live and time.monotonic() - self._last_draw > 0.5:
            self._last_draw = time.monotonic()
            self._redraw()

    def finished(self, tid: str, status: str, line: str) -> None:
        self.running.pop(tid, None)
        self.done[status] = self.done.get(status, 0) + 1
        self._redraw([line] if self.live else [line, self._summary()])


def error_message(trial) -> str:
    """The one-line cause of an errored trial (the original exception, not Ray's wrapper).

    Read from the trial's local error files, which Tune writes before calling `on_trial_error`.
    """
    import cloudpickle

    cause = None
    try:
        if trial.pickled_error_file and Path(trial.pickled_error_file).exists():
            with open(trial.pickled_error_file, "rb") as fh:
                cause = cloudpickle.load(fh)
    except Exception:  # noqa: BLE001 - an unreadable error file must not crash the driver
        cause = None
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


def trial_timing(
    records: list[dict],
    started_at: float | None,
    worker_started_at: float | None,
    trial_dir: Path,
    finished_at: float,
) -> dict:
    """Where a trial's wall time went, as unix times and the seconds between them (outcome.json
    "timing").

    started_at (driver: Tune started the trial's actor) -> worker_started_at (the trial function's
    first line) -> first_epoch_at (the first epoch began) -> last_report_at -> worker_finished_at
    (the trial function returned; missing if a scheduler stopped it at its last report) ->
    finished_at (driver: outcome written).
    """

    reported = [r for r in records if clean_float(r.get("reported_at")) is not None]
    first_epoch_at = last_report_at = None
    if reported:
        first_epoch_at = reported[0]["reported_at"] - (
            clean_float(reported[0].get("epoch_s")) or 0.0
        )
        last_report_at = reported[-1]["reported_at"]
    worker = {}
    try:
        worker = json.loads((Path(trial_dir) / names.WORKER_TIMES_FILE).read_text())
    except (OSError, ValueError):
        pass
    worker_finished_at = worker.get("finished_at")
    times = {
        "started_at": started_at,
        "worker_started_at": worker_started_at,
        "first_epoch_at": first_epoch_at,
        "last_report_at": last_report_at,
        "worker_finished_at": worker_finished_at,
        "finished_at": finished_at,
    }

    def between(a, b):
        return (
            round(times[b] - times[a], 3) if times[a] is not None and times[b] is not None else None
        )

    epochs_s = sum(clean_float(r.get("epoch_s")) or 0.0 for r in records)
    span = between("first_epoch_at", "last_report_at")
    out = {key: (round(value, 3) if value is not None else None) for key, value in times.items()}
    out.update(
        {
            # the worker process and the Tune actor already exist at started_at (on_trial_start
            # comes when the actor is ready): their start-up is in the slot's gap before started_at
            "worker_start_s": between("started_at", "worker_started_at"),
            "setup_s": between("worker_started_at", "first_epoch_at"),  # imports, data, model build
            "epochs_s": round(epochs_s, 3),
            "between_epochs_s": round(span - epochs_s, 3)
            if span is not None
            else None,  # saves, reports
            "report_wait_s": worker.get(
                "report_wait_s"
            ),  # of which blocked in tune.report (driver round trips)
            "wrap_up_s": between(
                "last_report_at", "worker_finished_at"
            ),  # final val metrics, summary
            "end_s": between("worker_finished_at", "finished_at")
            if worker_finished_at is not None
            else between("last_report_at", "finished_at"),  # the driver learns the trial ended
        }
    )
    return out


class StudyCallback(Callback):
    """Writes each trial's outcome when it ends and drives the progress view (runs in the driver)."""

    def __init__(
        self,
        ledger: Ledger,
        metric: str,
        mode: str,
        view: ProgressView,
        shown: tuple[str, ...],
        stopped: Callable[[str], bool] = lambda tid: False,
        optuna_number: Callable[[str], int | None] = lambda tid: None,
        on_change: Callable[[], None] = lambda: None,
        on_retry: Callable[[str], None] = lambda tid: None,
    ):
        """`on_retry(trial_id)`: a trial's worker died and Tune runs it again from scratch (the
        searcher forgets that attempt's results: study.tune.search.BackboneSearcher.forget)."""
        self.ledger, self.metric, self.mode, self.view, self.shown = (
            ledger,
            metric,
            mode,
            view,
            shown,
        )
        self.stopped, self.optuna_number, self.on_change = stopped, optuna_number, on_change
        self.on_retry = on_retry
        self.errors: dict[str, str] = {}  # trials whose code raised (their last report says it)
        self.retries: dict[str, list[str]] = {}  # why each retried trial's earlier attempts died
        self.records: dict[str, list[dict]] = {}
        self.nodes: dict[str, str] = {}
        self.pids: dict[
            str, int
        ] = {}  # each trial's worker process (reused workers run several trials)
        self.started_at: dict[str, float] = {}  # driver time Tune started each trial's actor
        self.worker_started_at: dict[str, float] = {}

    def _params(self, trial) -> dict:
        """The tuned keys only: the fixed ones are the same for every trial."""
        return {key: trial.config.get(key) for key in self.shown}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started_at[trial.trial_id] = time.time()
        self.records.setdefault(trial.trial_id, [])
        self.view.started(
            trial.trial_id,
            trial_line(
                trial.trial_id,
                trial.config.get("backbone", "?"),
                "running",
                None,
                self.metric,
                self._params(trial),
            ),
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.pids[trial.trial_id] = result.get("pid")
        if result.get(names.TRIAL_ERROR_KEY):  # our code raised: the trial ends now, as errored
            self.errors[trial.trial_id] = str(result[names.TRIAL_ERROR_KEY])
            return
        record = {k: result.get(k) for k in (*names.RECORD_KEYS, "trial_s", "reported_at")}
        self.records.setdefault(trial.trial_id, []).append(record)
        if result.get("worker_started_at") is not None:
            self.worker_started_at[trial.trial_id] = result["worker_started_at"]
        self.nodes[trial.trial_id] = result.get("node_ip")
        self.view.update(
            trial.trial_id,
            trial_line(
                trial.trial_id,
                trial.config.get("backbone", "?"),
                "running",
                record,
                self.metric,
                self._params(trial),
            ),
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        error = self.errors.pop(trial.trial_id, None)
        if error is not None:
            self._finish(trial, names.ERRORED, error)
            return
        status = names.STOPPED if self.stopped(trial.trial_id) else names.COMPLETED
        self._finish(trial, status, None)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's worker (or node) died and Tune queued the trial again
        (FailureConfig.max_failures): forget the dead attempt's epochs, so the outcome holds the new
        attempt's only."""
        tid = trial.trial_id
        cause = error_message(trial)
        self.retries.setdefault(tid, []).append(cause)
        self.records[tid] = []
        for times in (self.started_at, self.worker_started_at, self.nodes, self.pids):
            times.pop(tid, None)
        self.errors.pop(tid, None)
        try:
            self.on_retry(tid)
        except Exception:  # noqa: BLE001 - never let bookkeeping kill the study
            traceback.print_exc()
        self.view.started(
            tid,
            trial_line(
                tid,
                trial.config.get("backbone", "?"),
                "retrying",
                None,
                self.metric,
                self._params(trial),
                f"worker died ({cause}); run again from scratch",
            ),
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, names.ERRORED, error_message(trial))

    def _finish(self, trial, status: str, error: str | None) -> None:
        try:
            records = self.records.pop(trial.trial_id, [])
            summary = summarize_history(records, self.metric, self.mode)
            if status != names.ERRORED and summary["metric_value"] is None:
                status, error = names.ERRORED, f"no finite {self.metric} was reported"
            outcome = {
                "trial_id": trial.trial_id,
                "backbone": trial.config.get("backbone"),
                "status": status,
                "error": error,
                **summary,
                "optuna_trial": self.optuna_number(trial.trial_id),
                "node_ip": self.nodes.pop(trial.trial_id, None),
                "worker_pid": self.pids.pop(trial.trial_id, None),
                "retries": len(
                    self.retries.get(trial.trial_id, [])
                ),  # attempts lost to dead workers
                "retry_errors": self.retries.pop(trial.trial_id, []),
                "finished_at": round(time.time(), 3),
                "trial_dir": f"trials/{trial.trial_id}",
                "config": dict(trial.config),
                "history": records,
            }
            outcome["timing"] = trial_timing(
                records,
                self.started_at.pop(trial.trial_id, None),
                self.worker_started_at.pop(trial.trial_id, None),
                self.ledger.trials_dir / trial.trial_id,
                outcome["finished_at"],
            )
            self.ledger.record(outcome)
            last = records[-1] if records else None
            best = {
                **(last or {}),
                self.metric: summary["metric_value"],
                "epoch": summary["epochs_run"],
            }
            self.view.finished(
                trial.trial_id,
                status,
                trial_line(
                    trial.trial_id,
                    outcome["backbone"],
                    status,
                    best,
                    self.metric,
                    self._params(trial),
                    error,
                ),
            )
            self.on_change()
        except Exception:  # never let bookkeeping kill the study; say what went wrong
            traceback.print_exc()
