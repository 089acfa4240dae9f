"""Process-level backend setup: CPU thread counts, GPU memory growth, accelerator detection.

This is the ONE place in `fer/` that talks to a specific Keras backend (TensorFlow or JAX). Everything else
uses `keras` / `keras.ops` only, so the same trial runs under `KERAS_BACKEND=jax`.

Why threads matter: Ray sets OMP_NUM_THREADS for each trial, but TensorFlow ignores it and every trial then
uses every core (STACK-NOTES pitfall 4: 1 thread x 2 trials beat 2 threads x 1 trial, 99 s vs 200 s). Call
`configure_backend(threads=n)` at the start of a trial, before the first Keras operation runs.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

THREADS_ENV = ("FER_THREADS", "OMP_NUM_THREADS")


def backend_name() -> str:
    import keras

    return keras.backend.backend()


def _threads_from_env() -> int | None:
    for var in THREADS_ENV:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def configure_backend(threads: int | None = None) -> dict:
    """Limit CPU threads (argument, else $FER_THREADS, else $OMP_NUM_THREADS) and let GPU memory grow.

    Safe to call more than once; settings that can no longer change (the runtime already started) are
    logged and skipped, never fatal. Returns what was applied, for the trial's record.
    """
    threads = threads or _threads_from_env()
    name = backend_name()
    applied = {"backend": name, "threads": None}
    if name == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # the GPU is already initialised
                pass
        if threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(threads)
                applied["threads"] = threads
            except RuntimeError:
                current = tf.config.threading.get_intra_op_parallelism_threads()
                if current != threads:
                    log.warning("TensorFlow already started with %s threads; cannot change to %s",
                                current or "all", threads)
                applied["threads"] = current or None
    elif name == "jax":
        # XLA reads these when JAX initialises its backends; later calls cannot change them.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if threads:
            flag = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} " \
                   f"intra_op_parallelism_threads={threads}"
            if "jax" in sys.modules and _jax_initialised():
                log.warning("JAX already initialised; cannot limit it to %s threads", threads)
            else:
                os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
                applied["threads"] = threads
    return applied


def _jax_initialised() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # private API moved: assume the worst, only a warning depends on it
        return True


def accelerator_available() -> bool:
    """True when the backend sees a GPU (or TPU); decides what `mixed_precision=auto` means."""
    name = backend_name()
    if name == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if name == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if name == "torch":
        import torch

        return torch.cuda.is_available()
    return False
