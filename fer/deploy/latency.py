"""The deployment figures of a trained model: size, parameters, one-image latency and batch
throughput.

Measured once (at the end of a study, for each backbone's best model, or at export) and stored as
JSON with the machine description and the load average, so the report shows stored figures instead
of re-timing on whatever else the machine is doing then. Backend-neutral (`keras` only): the CPU
figures come from a copy of the model built under `keras.device("cpu:0")` (its variables live on the
CPU, so nothing is copied per call), the GPU ones from the model itself where the backend sees an
accelerator.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fer.core.names import LATENCY_FILE  # noqa: F401 - re-exported for callers

log = logging.getLogger(__name__)

RUNS = 50  # single-image calls timed (the issue asks for at least 50)
WARMUP = 5  # untimed calls first: tracing, compilation, allocator growth
BATCH = 64
BATCH_RUNS = 3


def _timed(predict, x, runs: int) -> tuple[list[float], float]:
    """Wall seconds of each of `runs` calls of predict(x), and the process CPU-seconds they took in
    all."""
    times = []
    cpu0 = _cpu_seconds()
    for _ in range(runs):
        start = time.perf_counter()
        predict(x)
        times.append(time.perf_counter() - start)
    return times, _cpu_seconds() - cpu0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def time_predict(
    predict: Callable[[np.ndarray], np.ndarray],
    image_size: int,
    runs: int = RUNS,
    warmup: int = WARMUP,
    batch: int = BATCH,
    batch_runs: int = BATCH_RUNS,
    seed: int = 0,
) -> dict:
    """Time `predict` (uint8 images (n, S, S, 3) -> probabilities) on random images.

    One image: median and 90th percentile wall milliseconds over `runs` calls after `warmup` calls,
    and the process CPU milliseconds per call (tells a busy machine from a slow model). Batch:
    images/s of the best of `batch_runs` timed calls of `batch` images after one warm-up call (best,
    not mean: on a shared machine the slower runs measure the neighbours), and the CPU milliseconds
    per image of those calls."""
    rng = np.random.default_rng(seed)
    one = rng.integers(0, 256, (1, image_size, image_size, 3), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    for _ in range(warmup):
        predict(one)
    times, cpu_s = _timed(predict, one, runs)
    cpu_ms = cpu_s / runs * 1e3
    predict(many)
    batch_times, cpu_s = _timed(predict, many, batch_runs)
    batch_cpu_ms = cpu_s / (batch_runs * batch) * 1e3
    ms = np.array(times) * 1e3
    return {
        "latency_ms_median": round(float(np.median(ms)), 3),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 3),
        "cpu_ms_per_image": round(cpu_ms, 3),
        "runs": runs,
        "warmup": warmup,
        "batch": batch,
        "images_per_s": round(batch / min(batch_times), 1),
        "batch_cpu_ms_per_image": round(batch_cpu_ms, 3),
    }


def weight_bytes(model) -> int:
    """Bytes of the model's variables (trainable and not) as stored: what a float export holds, give
    or take the graph; the `.keras` file adds the optimizer's state (twice as much again for Adam).
    """
    return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights))


def _cpu_copy(model):
    """The model rebuilt with its variables on the CPU (same weights)."""
    import keras

    with keras.device("cpu:0"):
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
    return copy


def _keras_predict(model) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.asarray(model.predict_on_batch(x))


def measure_model(model, threads: int | None = None, runs: int = RUNS, batch: int = BATCH) -> dict:
    """Size, parameters and per-device timings of a Keras model taking uint8 (n, S, S, 3) images."""
    import keras

    from fer.runtime.backend import accelerator_available

    size = int(model.input_shape[1])
    result = {
        "backbone": model.name.removeprefix("fer_"),
        "image_size": size,
        "params": int(model.count_params()),
        "size_bytes": weight_bytes(model),
        "size_source": "model variables (float export size, without optimizer state)",
        "backend": keras.backend.backend(),
        "threads": threads,
        "devices": {},
    }
    load_before = load_average()
    result["devices"]["cpu"] = time_predict(
        _keras_predict(_cpu_copy(model)), size, runs=runs, batch=batch
    )
    if accelerator_available():
        result["devices"]["gpu"] = time_predict(_keras_predict(model), size, runs=runs, batch=batch)
    return _with_machine(result, load_before)


def _with_machine(result: dict, load_before) -> dict:
    from fer.runtime.machine import machine_info

    return {
        **result,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "measured_at": round(time.time(), 1),
        "machine": machine_info(),
    }


def measure_safely(model, threads: int | None = None) -> dict | None:
    """`measure_model`, with a failure logged, never raised: the timing is an extra, and must not
    cost the caller (the study's best-model evaluation) its real results."""
    try:
        return measure_model(model, threads)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("latency measurement of %s failed: %s", getattr(model, "name", "model"), exc)
        return None


def measure_and_write(
    model, path: str | Path, threads: int | None = None, measured: dict | None = None
) -> dict | None:
    """`measure_safely` written to `path` as JSON; `measured`: this model's figures taken earlier
    (the study's Evaluator measures a preloaded model while the last trials run), written instead of
    timing again."""
    result = measured if measured is not None else measure_safely(model, threads)
    if result is not None:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def measure_predict(
    predict: Callable[[np.ndarray], np.ndarray], image_size: int, size_bytes: int, runtime: str
) -> dict:
    """The same figures for an exported model's runtime (CPU only: TFLite, ONNX Runtime,
    SavedModel)."""
    load_before = load_average()
    timing = time_predict(predict, image_size)
    return _with_machine(
        {
            "runtime": runtime,
            "image_size": image_size,
            "size_bytes": int(size_bytes),
            "devices": {"cpu": timing},
        },
        load_before,
    )
