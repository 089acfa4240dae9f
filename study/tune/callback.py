"""The driver side of a running study: record each trial as it ends, and show one line per trial.

`StudyCallback` is a Ray Tune callback (it runs in the driver process): it keeps what it sees of
each trial's current attempt (study.tune.outcome.Attempt: its per-epoch results and times), writes
the trial's outcome (trials/<id>/outcome.json, trials.csv) the moment it ends, and feeds the
progress view (study.tune.progress_view).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable

from ray.tune import Callback

from fer.core import names
from study.space import Space
from study.tune.ledger import Ledger, summarize_history
from study.tune.outcome import Attempt, error_message, trial_timing
from study.tune.progress_view import ProgressView, trial_line


def _never(trial_id: str) -> bool:
    return False


def _unknown(trial_id: str) -> int | None:
    return None


def _nothing(*args) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class TrialHooks:
    """What the callback asks of the search around it (each one: nothing, by default)."""

    stopped: Callable[[str], bool] = _never  # the scheduler stopped this trial early
    optuna_number: Callable[[str], int | None] = _unknown  # its number in its Optuna study
    on_change: Callable[[], None] = _nothing  # after each outcome is written
    # a trial's worker died and Tune runs it again from scratch (the searcher forgets that
    # attempt's results: study.tune.search.BackboneSearcher.forget)
    on_retry: Callable[[str], None] = _nothing
    # with storage (study.storage.mirror.StudyMirror): a trial started (Optuna's ask is saved),
    # its folder comes into the driver's mirror before its outcome is written, and the outcome and
    # the study files it changed go to the storage right after
    on_start: Callable[[str], None] = _nothing
    fetch_trial: Callable[[str], None] = _nothing
    outcome_written: Callable[[str], None] = _nothing


class StudyCallback(Callback):
    """Writes each trial's outcome when it ends and drives the progress view (runs in the
    driver)."""

    def __init__(
        self, ledger: Ledger, view: ProgressView, space: Space, hooks: TrialHooks | None = None
    ):
        self.ledger, self.view, self.hooks = ledger, view, hooks or TrialHooks()
        self.metric, self.mode = space.metric, space.mode
        self.shown = tuple(space.space)  # the tuned keys: the fixed ones are the same everywhere
        self.attempts: dict[str, Attempt] = {}
        self.errors: dict[str, str] = {}  # trials whose code raised (their last report says it)
        self.retries: dict[str, list[str]] = {}  # why each retried trial's earlier attempts died

    def _line(self, trial, state: str, record: dict | None = None, error: str | None = None):
        params = {key: trial.config.get(key) for key in self.shown}
        backbone = trial.config.get("backbone", "?")
        return trial_line(trial.trial_id, backbone, state, record, self.metric, params, error)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.attempts.setdefault(trial.trial_id, Attempt()).started_at = time.time()
        self.view.started(trial.trial_id, self._line(trial, "running"))
        try:
            self.hooks.on_start(trial.trial_id)
        except Exception:  # noqa: BLE001 - never let bookkeeping kill the study
            traceback.print_exc()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        attempt = self.attempts.setdefault(trial.trial_id, Attempt())
        attempt.pid = result.get("pid")
        if result.get(names.TRIAL_ERROR_KEY):  # our code raised: the trial ends now, as errored
            self.errors[trial.trial_id] = str(result[names.TRIAL_ERROR_KEY])
            return
        record = {k: result.get(k) for k in (*names.RECORD_KEYS, "trial_s", "reported_at")}
        attempt.records.append(record)
        if result.get("worker_started_at") is not None:
            attempt.worker_started_at = result["worker_started_at"]
        attempt.node_ip = result.get("node_ip")
        self.view.update(trial.trial_id, self._line(trial, "running", record))

    def on_trial_complete(self, iteration, trials, trial, **info):
        error = self.errors.pop(trial.trial_id, None)
        if error is not None:
            self._finish(trial, names.ERRORED, error)
            return
        status = names.STOPPED if self.hooks.stopped(trial.trial_id) else names.COMPLETED
        self._finish(trial, status, None)

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The trial's worker (or node) died and Tune queued the trial again
        (FailureConfig.max_failures): forget the dead attempt's epochs, so the outcome holds the new
        attempt's only."""
        tid = trial.trial_id
        cause = error_message(trial)
        self.retries.setdefault(tid, []).append(cause)
        self.attempts[tid] = Attempt()
        self.errors.pop(tid, None)
        try:
            self.hooks.on_retry(tid)
        except Exception:  # noqa: BLE001 - never let bookkeeping kill the study
            traceback.print_exc()
        message = f"worker died ({cause}); run again from scratch"
        self.view.started(tid, self._line(trial, "retrying", error=message))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, names.ERRORED, error_message(trial))

    def _finish(self, trial, status: str, error: str | None) -> None:
        """Write the trial's outcome, show its last line, tell the search (`on_change`)."""
        try:
            attempt = self.attempts.pop(trial.trial_id, None) or Attempt()
            self.hooks.fetch_trial(trial.trial_id)
            summary = summarize_history(attempt.records, self.metric, self.mode)
            if status != names.ERRORED and summary["metric_value"] is None:
                status, error = names.ERRORED, f"no finite {self.metric} was reported"
            outcome = self._outcome(trial, status, error, attempt, summary)
            self.ledger.record(outcome)
            self.hooks.outcome_written(trial.trial_id)
            last = attempt.records[-1] if attempt.records else {}
            best = {**last, self.metric: summary["metric_value"], "epoch": summary["epochs_run"]}
            self.view.finished(trial.trial_id, status, self._line(trial, status, best, error))
            self.hooks.on_change()
        except Exception:  # never let bookkeeping kill the study; say what went wrong
            traceback.print_exc()

    def _outcome(
        self, trial, status: str, error: str | None, attempt: Attempt, summary: dict
    ) -> dict:
        """outcome.json (docs/results.md): the trials.csv row, plus config, history and timing."""
        tid = trial.trial_id
        retry_errors = self.retries.pop(tid, [])
        outcome = {
            "trial_id": tid,
            "backbone": trial.config.get("backbone"),
            "status": status,
            "error": error,
            **summary,
            "optuna_trial": self.hooks.optuna_number(tid),
            "node_ip": attempt.node_ip,
            "worker_pid": attempt.pid,
            "retries": len(retry_errors),  # attempts lost to dead workers
            "retry_errors": retry_errors,
            "finished_at": round(time.time(), 3),
            "trial_dir": f"{names.TRIALS_DIR}/{tid}",
            "config": dict(trial.config),
            "history": attempt.records,
        }
        trial_dir = self.ledger.trials_dir / tid
        outcome["timing"] = trial_timing(attempt, trial_dir, outcome["finished_at"])
        return outcome
