"""What runs inside a Ray worker: one trial, and the best-model evaluation tasks.

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
from pathlib import Path

from ray import tune

from fer.core import names
from fer.core.files import write_json

REPORT_KEYS = tuple(
    key for key in names.RECORD_KEYS if key != "stage"
)  # numbers; the stage is added as text


def trial_threads(cpus: float) -> int:
    """Threads for a trial holding `cpus` (fractional) CPUs: at least one."""
    return max(1, int(math.floor(cpus + 1e-9)))


def trial_resources(cpus: float, gpus: float) -> dict:
    """The Ray resources one trial (or evaluation task) asks for; fractional GPUs share a device."""
    resources = {"cpu": float(cpus)}
    if gpus:
        resources["gpu"] = float(gpus)
    return resources


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
    (start-up included), and two unix times for the study's timing breakdown: `worker_started_at`
    (the trial function's first line in its worker) and `reported_at` (this report)."""

    def __init__(self, started: float, started_at: float | None = None):
        self.started = started
        self.started_at = (
            time.time() - (time.perf_counter() - started) if started_at is None else started_at
        )
        self.report_wait_s = 0.0  # time the training thread spent blocked in tune.report
        self.nan_loss = False  # FOR TESTS ONLY: report a NaN training loss (see _test_nan_loss)

    def __call__(self, record: dict) -> None:
        if self.nan_loss:
            record = {**record, "loss": float("nan")}
        metrics = {
            key: float(record[key])
            for key in REPORT_KEYS
            if isinstance(record.get(key), (int, float))
        }
        metrics["stage"] = record.get("stage", "")
        metrics["trial_s"] = time.perf_counter() - self.started
        metrics["worker_started_at"] = self.started_at
        metrics["reported_at"] = time.time()
        waited = time.perf_counter()
        tune.report(
            metrics
        )  # returns when the driver has processed the result (Tune reports synchronously)
        self.report_wait_s += time.perf_counter() - waited
        check_finite(record)  # after the report, so the NaN epoch is in the trial's history too
        _test_kill_once()


# Optional packages `import keras` (or TensorFlow under it) imports when they are installed, each
# behind a try/except ImportError, for features trials never use: scikit-learn for keras.wrappers
# (0.7 s), IPython for notebook display in keras.saving (0.4 s), matplotlib.pyplot for
# keras.visualization (0.35 s), and, under the TensorFlow backend, JAX for TFLite's JAX converter
# (0.45 s). Seconds: one 2-core CPU, with everything installed.
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
    except (
        ImportError
    ):  # a release that needs one of them at import (or JAX from keras.json): the normal way
        for name in [n for n in sys.modules if n == "keras" or n.startswith("keras.")]:
            del sys.modules[name]
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    import keras  # noqa: F401,F811 - a no-op after the lean import


def train_trial(config: dict, context: dict) -> None:
    """Tune function trainable: one `fer.train.trial.run_trial` in `<trials_dir>/<trial_id>/`.

    Faults (INTERNALS.md, "Faults and retries"): an exception raised by our code (a NaN loss
    included) is caught here, its traceback written to error.txt and its one line sent as a last
    report (`names.TRIAL_ERROR_KEY`), and the trial ENDS NORMALLY: the driver records it as errored
    and Ray Tune's retry (`FailureConfig(max_failures)`, which would repeat any failure) is left
    with the failures that never reach this code: the worker process or its node died (an OOM kill,
    a lost machine). A retried trial starts from scratch: the folder its dead attempt left is
    removed first."""
    started, started_at = time.perf_counter(), time.time()
    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(context["trials_dir"]) / trial_id
    if out_dir.exists():  # a previous attempt of this trial died: start again from scratch
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        reused = "keras" in sys.modules  # a warm worker (run's default): an earlier trial ran here
        import_keras_lean()
        if reused:
            from fer.train.trial import fresh_keras_state

            fresh_keras_state()
        from fer.runtime.backend import configure_backend

        configure_backend(threads=context["threads"])
        from fer.core.progress import log_to_file

        log_to_file(context["study_log"])
        from fer.data import StudyData
        from fer.train.trial import run_trial

        study_data = StudyData(context["data_dir"])
        reporter = EpochReporter(started, started_at)
        reporter.nan_loss = _test_nan_loss(config)
        decisions = set(context.get("decision_epochs", ()))
        run_trial(
            config,
            study_data,
            out_dir,
            on_epoch=reporter,
            evaluate_test=False,
            report_can_stop=decisions.__contains__,
            reuse_model=bool(
                context.get("reuse_workers")
            ),  # a warm worker keeps its model for the next trial
        )
    except Exception as exc:  # noqa: BLE001 - recorded as the trial's error, never retried (see above)
        report_error(exc, out_dir, context.get("metric"))
        return
    # After the last report (it may not run when a scheduler stops the trial,
    # docs/pitfalls.md#last-report): when the worker finished its own work, for the study's timing
    # breakdown (outcome.json "timing").
    import psutil  # a Ray dependency

    write_json(
        out_dir / names.WORKER_TIMES_FILE,
        {
            "started_at": started_at,
            "finished_at": time.time(),
            "report_wait_s": round(reporter.report_wait_s, 3),
            # the worker's resident memory now (warm workers: it must
            # stay flat, benchmarks/worker_memory.py)
            "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        },
    )


def report_error(exc: BaseException, out_dir: Path, metric: str | None) -> None:
    """Send a trial's error as its last report (the metric as NaN: Tune wants it in every report)
    and keep the traceback in the trial folder (error.txt), since Tune never sees the exception."""
    import traceback

    message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / names.ERROR_FILE).write_text("".join(traceback.format_exception(exc)))
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


def evaluate_best(
    trial_dir: str,
    best_dir: str,
    data_dir: str,
    threads: int,
    selection: dict,
    model=None,
    latency: dict | None = None,
) -> dict:
    """Reload a trial's best model and evaluate it ONCE on the test split (and on val if the trial
    was stopped before writing val_metrics.json). Runs in an Evaluator actor (or a Ray task) with a
    trial's resources; `model`: the trial's model.keras already loaded by that process; `latency`:
    that model's deployment figures already measured (fer.deploy.latency), else they are measured
    here.

    `selection` (which trial, by which metric) is written with the results as selection.json, in the
    same atomic step that publishes best/<backbone>/."""
    import shutil

    from fer.runtime.backend import configure_backend

    configure_backend(threads=threads)
    from fer.core.config import load_config
    from fer.data import StudyData
    from fer.evaluate.on_split import evaluate_split
    from fer.model.build import load_trained_model

    src, dst = Path(trial_dir), Path(best_dir)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in names.TRIAL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    config = load_config(tmp / names.CONFIG_FILE)
    if model is None:
        model = load_trained_model(tmp / names.MODEL_FILE)
    study_data = StudyData(data_dir)
    if not (tmp / names.VAL_METRICS_FILE).exists():
        evaluate_split(model, study_data, "val", config, tmp)
    result = evaluate_split(model, study_data, "test", config, tmp)
    from fer.deploy.latency import LATENCY_FILE, measure_and_write

    # deployment figures, stored once (the report reads them)
    measure_and_write(model, tmp / LATENCY_FILE, threads, measured=latency)
    write_json(tmp / names.SELECTION_FILE, {**selection, **result})
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)  # best/<backbone>/ appears complete or not at all
    return {**selection, **result}


class Evaluator:
    """A worker process for `evaluate_best` that starts (imports TensorFlow/Keras, sets threads)
    before it is asked to evaluate anything. The study starts one as soon as a slot is free for good
    (every trial has been handed out and one has finished), so the start-up runs on a core that
    would otherwise idle while the last trials finish, and the best-model evaluation after the
    search does not pay a new process and a TensorFlow import. It knows nothing of the test split
    until `evaluate` is called with the final best."""

    def __init__(self, threads: int):
        import_keras_lean()
        from fer.runtime.backend import configure_backend

        configure_backend(threads=threads)
        import keras

        import fer.core.config  # noqa: F401 - imported now, while the core is idle
        import fer.data  # noqa: F401
        import fer.train.trial  # noqa: F401

        keras.ops.convert_to_numpy(
            keras.ops.ones((1,)) + 1
        )  # the backend's runtime starts here, not later
        self.threads = threads
        self.preloaded: tuple[str, object, dict | None] | None = (
            None  # trial folder, model, its latency figures
        )

    def preload(self, trial_dir: str) -> bool:
        """Load a finished trial's model, trace its predict step on blank images (no data is read)
        and take its deployment figures (fer.deploy.latency: timed on blank images too), so that if
        this trial is still the best when the search ends, its evaluation only has the test split
        left to run. Called while the last trials run, on a core no trial will take, for the best
        finished trial so far; a later call replaces the model. The latency timing was ~90 % of a
        MobileNetV2 evaluation (3.7 of 4.1 s at 96 px)."""
        import numpy as np

        from fer.core.config import load_config
        from fer.data.batches import predict_probs
        from fer.deploy.latency import measure_safely
        from fer.model.build import load_trained_model

        if self.preloaded is not None and self.preloaded[0] == trial_dir:
            return True
        self.preloaded = None
        try:
            config = load_config(Path(trial_dir) / names.CONFIG_FILE)
            size, batch = config["image_size"], config["batch_size"]
            model = load_trained_model(Path(trial_dir) / names.MODEL_FILE)
            predict_probs(model, np.zeros((batch, size, size, 3), np.uint8), batch)
        except Exception:  # noqa: BLE001 - only a head start: evaluate() loads the model itself
            return False
        self.preloaded = (trial_dir, model, measure_safely(model, self.threads))
        return True

    def evaluate(
        self, trial_dir: str, best_dir: str, data_dir: str, threads: int, selection: dict
    ) -> dict:
        warm = (
            self.preloaded
            if self.preloaded is not None and self.preloaded[0] == trial_dir
            else None
        )
        self.preloaded = None
        if warm is None:
            return evaluate_best(trial_dir, best_dir, data_dir, threads, selection)
        return evaluate_best(
            trial_dir, best_dir, data_dir, threads, selection, model=warm[1], latency=warm[2]
        )


def retrain_seed(config: dict, out_dir: str, data_dir: str, threads: int) -> dict:
    """Retrain the best configuration with another seed and evaluate it on the test split
    (final_seeds)."""
    from fer.runtime.backend import configure_backend

    configure_backend(threads=threads)
    from fer.data import StudyData
    from fer.train.trial import run_trial

    return run_trial(config, StudyData(data_dir), out_dir, evaluate_test=True)
