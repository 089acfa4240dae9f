"""What runs inside a Ray worker to train: one trial of the search (`train_trial`), and one
retraining after it (`retrain_seed`: final_seeds, the naive split). The best-trial evaluation runs
in study.tune.evaluator.

Trials receive only paths (the prepared study folder, the trial folder), never arrays through Ray's
object store: every trial memory-maps the shared pixel cache (fer.data.StudyData), which costs no
copies and works the same on one machine or on a cluster with a shared filesystem.

Each worker first calls `fer.runtime.backend.configure_backend` with the trial's CPU count
(TensorFlow ignores OMP_NUM_THREADS, docs/pitfalls.md#threads) and GPU memory growth, before any
model is built.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ray import tune

from fer.core import names
from fer.core.files import write_json
from study.tune.options import TrialContext

# numbers; the stage is added as text
REPORT_KEYS = tuple(key for key in names.RECORD_KEYS if key != "stage")


def check_finite(record: dict) -> None:
    """Fail the trial on a NaN/inf training loss, the way keras.callbacks.TerminateOnNaN would, but
    with a message that names the epoch (it lands in trials.csv)."""
    loss = record.get("loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss} at epoch {record.get('epoch')} ({record.get('stage')} stage)"
        )


class EpochReporter:
    """Our small Keras-to-Tune bridge (no TuneReportCallback, docs/pitfalls.md#tune-callback): one
    `tune.report` per epoch record, plus `trial_s`, the trial's wall time so far in its worker
    (start-up included), `finetune_epoch` (fine-tune epochs so far, 0 through the head stage: the
    clock of ASHA's rungs, study.tune.search), and two unix times for the study's timing breakdown:
    `worker_started_at` (the trial function's first line in its worker) and `reported_at` (this
    report)."""

    def __init__(self, started: float, started_at: float | None = None):
        self.started = started
        self.started_at = (
            time.time() - (time.perf_counter() - started) if started_at is None else started_at
        )
        self.report_wait_s = 0.0  # time the training thread spent blocked in tune.report
        self.head_epochs = self.finetune_epochs = 0  # epochs reported so far, per stage
        self.nan_loss = False  # FOR TESTS ONLY: report a NaN training loss (see _test_nan_loss)
        # with storage: upload the trial folder before a report after which the trial may be
        # stopped (`save_before(epoch)` says which), so the driver never reads a missing file
        self.save_before: Callable[[int], bool] = lambda epoch: False
        self.save: Callable[[], None] = lambda: None

    def __call__(self, record: dict) -> None:
        if self.nan_loss:
            record = {**record, "loss": float("nan")}
        metrics = {
            key: float(record[key])
            for key in REPORT_KEYS
            if isinstance(record.get(key), (int, float))
        }
        metrics["stage"] = record.get("stage", "")
        if metrics["stage"] == "finetune":
            self.finetune_epochs += 1
        else:
            self.head_epochs += 1
        metrics["finetune_epoch"] = self.finetune_epochs
        metrics["trial_s"] = time.perf_counter() - self.started
        metrics["worker_started_at"] = self.started_at
        metrics["reported_at"] = time.time()
        if self.save_before(int(record.get("epoch") or 0)):
            self.save()
        waited = time.perf_counter()
        # returns when the driver has processed the result (Tune reports synchronously)
        tune.report(metrics)
        self.report_wait_s += time.perf_counter() - waited
        check_finite(record)  # after the report, so the NaN epoch is in the trial's history too
        _test_kill_once()


# Optional packages `import keras` (or TensorFlow under it) imports when they are installed, each
# behind a try/except ImportError, for features trials never use: scikit-learn for keras.wrappers,
# IPython for notebook display in keras.saving, matplotlib.pyplot for keras.visualization, and,
# under the TensorFlow backend, JAX for TFLite's JAX converter (their import times:
# docs/benchmarks.md).
HIDDEN_AT_KERAS_IMPORT = ("sklearn", "IPython", "matplotlib")
HIDDEN_UNLESS_JAX_BACKEND = ("jax", "jaxlib")


def import_keras_lean() -> None:
    """Import Keras (and its backend) without the optional packages above, in a fresh worker
    process.

    Every trial process pays the import, so they are hidden while Keras is imported (each import
    raises ImportError and the module carries on without it) and visible again right after, so later
    code can still import them normally. A no-op when Keras is already imported; one already
    imported stays as it is."""
    if "keras" in sys.modules:
        return
    hidden = HIDDEN_AT_KERAS_IMPORT
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "jax":
        hidden += HIDDEN_UNLESS_JAX_BACKEND
    hidden = tuple(name for name in hidden if name not in sys.modules)
    for name in hidden:
        sys.modules[name] = None  # `import name` raises ImportError while this is here
    try:
        import keras  # noqa: F401
    except ImportError:
        # a release that needs one of them at import (or JAX from keras.json): the normal way
        for name in [n for n in sys.modules if n == "keras" or n.startswith("keras.")]:
            del sys.modules[name]
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    import keras  # noqa: F401,F811 - a no-op after the lean import


def train_trial(config: dict, context: TrialContext) -> None:
    """Tune function trainable: one `fer.train.trial.run_trial` in `trials/<trial_id>/`.

    Faults (INTERNALS.md, "Faults and retries"): an exception raised by our code (a NaN loss
    included) is caught here, its traceback written to error.txt and its one line sent as a last
    report (`names.TRIAL_ERROR_KEY`), and the trial ENDS NORMALLY: the driver records it as errored
    and Ray Tune's retry (`FailureConfig(max_failures)`, which would repeat any failure) is left
    with the failures that never reach this code: the worker process or its node died (an OOM kill,
    a lost machine). A retried trial starts from scratch: the folder its dead attempt left is
    removed first (in storage too).

    With storage (`context.home.remote`), the trial works in a node-local folder and uploads it
    before every report after which it may be stopped, after an error, and before it returns."""
    started, started_at = time.perf_counter(), time.time()
    trial_id = tune.get_context().get_trial_id()
    rel = f"{names.TRIALS_DIR}/{trial_id}"
    out_dir = trial_folder(context, trial_id)
    reporter = EpochReporter(started, started_at)
    try:
        _remove_dead_attempt(context, trial_id, out_dir)
        _ready_worker(context, out_dir)
        reporter.nan_loss = _test_nan_loss(config)
        if context.home is not None and context.home.remote:
            reporter.save_before = report_can_stop(config, context, reporter)
            reporter.save = lambda: context.home.push(rel)
        _run(config, context, out_dir, reporter)
    except Exception as exc:  # noqa: BLE001 - the trial's error, never retried (see above)
        report_error(exc, out_dir, context.metric, save=reporter.save)
        _drop_node_copy(context, out_dir)
        return
    _write_worker_times(out_dir, started_at, reporter)
    reporter.save()
    _drop_node_copy(context, out_dir)


def _drop_node_copy(context: TrialContext, out_dir: Path) -> None:
    """With storage, a finished trial's node-local folder goes once it is uploaded (a node would
    otherwise keep a model file per trial); a trial stopped by the scheduler leaves its folder in
    the node cache (docs/cluster.md)."""
    if context.home is not None and context.home.remote:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)


def trial_folder(context: TrialContext, trial_id: str) -> Path:
    """Where this trial writes: `<trials_dir>/<trial_id>` on a study folder every node sees, a
    node-local folder with storage."""
    if context.home is not None and context.home.remote:
        return context.home.local(f"{names.TRIALS_DIR}/{trial_id}")
    return Path(context.trials_dir) / trial_id


def _remove_dead_attempt(context: TrialContext, trial_id: str, out_dir: Path) -> None:
    """A previous attempt of this trial died (Tune retries it): start again from scratch."""
    if context.home is not None and context.home.remote:
        context.home.clear(f"{names.TRIALS_DIR}/{trial_id}")
    elif out_dir.exists():
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)


def _ready_worker(context: TrialContext, out_dir: Path) -> None:
    """Keras imported (lean), or in a warm worker (run's default: an earlier trial ran here) its
    state from that trial cleared; then the backend's threads, and where progress lines of one-off
    steps go: the study log, or with storage the trial's own log, which the driver appends to the
    study log."""
    reused = "keras" in sys.modules
    import_keras_lean()
    if reused:
        from fer.train.warm import fresh_keras_state

        fresh_keras_state()
    from fer.runtime.backend import configure_backend

    configure_backend(threads=context.threads)
    from fer.core.progress import log_to_file

    if context.home is not None and context.home.remote:
        log_to_file(out_dir / names.TRIAL_LOG_FILE, only=True)
    else:
        log_to_file(context.study_log)


def _run(config: dict, context: TrialContext, out_dir: Path, reporter: EpochReporter) -> None:
    """The trial itself, reporting each epoch; it saves its best model before the reports after
    which the scheduler may stop it (and at its end)."""
    from fer.data import StudyData
    from fer.train.trial import run_trial

    remote = context.home is not None and context.home.remote
    run_trial(
        config,
        StudyData(context.home.data() if remote else context.data_dir),
        out_dir,
        on_epoch=reporter,
        evaluate_test=False,
        report_can_stop=report_can_stop(config, context, reporter),
        reuse_model=context.reuse_workers,  # a warm worker keeps its model for the next trial
    )


def report_can_stop(config: dict, context: TrialContext, reporter: EpochReporter):
    """`run_trial`'s `report_can_stop(epoch)`: whether the report of the trial's global `epoch`
    falls on one of its backbone's decision points (none without a scheduler), which count the
    global epoch or, on the fine-tune clock, the fine-tune epochs (study.tune.search).

    The fine-tune epoch is the global epoch less the head epochs reported before it, not less
    `epochs_head`: early stopping may end the head stage sooner. Before the first fine-tune
    report that reads 1 for a head epoch too, so a grace period of 1 also saves on head epochs
    (an extra save; a decision point is never missed)."""
    clock, points = context.decision_epochs.get(config.get("backbone"), ("epoch", ()))
    points = frozenset(points)
    if clock == "epoch":
        return points.__contains__
    return lambda epoch: epoch - reporter.head_epochs in points


def _write_worker_times(out_dir: Path, started_at: float, reporter: EpochReporter) -> None:
    """After the last report (it may not run when a scheduler stops the trial,
    docs/pitfalls.md#last-report): when the worker finished its own work, for the study's timing
    breakdown (outcome.json "timing")."""
    import psutil  # a Ray dependency

    write_json(
        out_dir / names.WORKER_TIMES_FILE,
        {
            "started_at": started_at,
            "finished_at": time.time(),
            "report_wait_s": round(reporter.report_wait_s, 3),
            # the worker's resident memory now (warm workers: it must stay flat,
            # benchmarks/worker_memory.py)
            "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        },
    )


def report_error(
    exc: BaseException, out_dir: Path, metric: str | None, save: Callable[[], None] = lambda: None
) -> None:
    """Send a trial's error as its last report (the metric as NaN: Tune wants it in every report)
    and keep the traceback in the trial folder (error.txt, uploaded first with `save`), since Tune
    never sees the exception."""
    import traceback

    message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / names.ERROR_FILE).write_text("".join(traceback.format_exception(exc)))
        save()
    except OSError:
        pass
    result = {names.TRIAL_ERROR_KEY: message}
    if metric:
        result[metric] = float("nan")
    tune.report(result)


KILL_ONCE_ENV = "FER_TEST_KILL_ONCE"
NAN_DROPOUT_ENV = "FER_TEST_NAN_DROPOUT"


def _test_nan_loss(config: dict) -> bool:
    """FOR TESTS ONLY (tests/test_faults.py): with FER_TEST_NAN_DROPOUT=<x>, a trial whose dropout
    is x reports a NaN training loss at its first epoch (no valid config makes the tiny test models
    diverge)."""
    import os

    wanted = os.environ.get(NAN_DROPOUT_ENV)
    return bool(wanted) and abs(float(config.get("dropout", -1.0)) - float(wanted)) < 1e-9


def _test_kill_once() -> None:
    """FOR TESTS ONLY (tests/test_faults.py): with FER_TEST_KILL_ONCE=<folder>, the first trial of
    the study to get here (after its first epoch report, with a finite loss) claims <folder>/claimed
    and SIGKILLs its own worker process, as an OOM kill would; every later attempt and trial finds
    the claim and goes on."""
    import os

    folder = os.environ.get(KILL_ONCE_ENV)
    if not folder:
        return
    try:
        os.mkdir(Path(folder) / "claimed")
    except OSError:
        return
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def retrain_seed(config: dict, home, out_rel: str, data_prefix: str, threads: int) -> dict:
    """Retrain a selected configuration (with another seed: final_seeds; on another split: the
    naive split) into `out_rel` of the study (`home`: a study.storage.home.StudyHome) and evaluate
    it on the test split; with storage, its folder is uploaded before it returns."""
    from fer.runtime.backend import configure_backend

    configure_backend(threads=threads)
    from fer.data import StudyData
    from fer.train.trial import run_trial

    data = StudyData(home.data(data_prefix))
    summary = run_trial(config, data, home.local(out_rel), evaluate_test=True)
    if home.remote:  # uploaded, then this node's copy goes (as a trial's does)
        import shutil

        home.push(out_rel)
        shutil.rmtree(home.local(out_rel), ignore_errors=True)
    return summary
