"""Process-level backend setup: CPU thread counts, GPU memory growth, accelerator detection.

This is the ONE place in `fer/` that talks to a specific Keras backend (TensorFlow or JAX).
Everything else uses `keras` / `keras.ops` only, so the same trial runs under `KERAS_BACKEND=jax`.

Why threads matter: Ray sets OMP_NUM_THREADS for each trial, but TensorFlow ignores it and every
trial then uses every core, and two trials fight over them (docs/pitfalls.md#threads). Call
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
    """Limit CPU threads (argument, else $FER_THREADS, else $OMP_NUM_THREADS) and let GPU memory
    grow.

    Safe to call more than once; settings that can no longer change (the runtime already started)
    are logged and skipped, never fatal. Returns what was applied, for the trial's record.
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
                    log.warning(
                        "TensorFlow already started with %s threads; cannot change to %s",
                        current or "all",
                        threads,
                    )
                applied["threads"] = current or None
    elif name == "jax":
        # XLA reads these when JAX initialises its backends; later calls cannot change them.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        if threads:
            flag = (
                f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                f"intra_op_parallelism_threads={threads}"
            )
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


def mixed_precision_dtype() -> str | None:
    """The mixed-precision compute dtype `mixed_precision=auto` uses: 'bfloat16' on GPUs of compute
    capability 8.0 or more (Ampere and later: as fast as float16, with float32's range, so no loss
    scaling) and TPUs, 'float16' on older GPUs, None (float32) without an accelerator: on CPUs mixed
    precision did not help (docs/benchmarks.md)."""
    if not accelerator_available():
        return None
    capability = _gpu_compute_capability()
    return "float16" if capability is not None and capability < (8, 0) else "bfloat16"


def _gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU, None if unknown (or a TPU)."""
    try:
        name = backend_name()
        if name == "jax":
            import jax

            value = getattr(jax.devices()[0], "compute_capability", None)
            return tuple(int(v) for v in str(value).split(".")[:2]) if value else None
        if name == "tensorflow":
            import tensorflow as tf

            details = tf.config.experimental.get_device_details(
                tf.config.list_physical_devices("GPU")[0]
            )
            return (
                tuple(details["compute_capability"]) if details.get("compute_capability") else None
            )
        if name == "torch":
            import torch

            return tuple(torch.cuda.get_device_capability())
    except Exception as exc:  # unusual device: fall back to bfloat16's rule, never fail a trial
        log.warning("could not read the GPU's compute capability (%s); assuming 8.0+", exc)
    return None


def enable_compilation_cache(folder) -> str | None:
    """JAX: keep compiled XLA programs in `folder` (the study's `compile_cache/`, shared by all its
    workers), so a later trial whose steps lower to the same program loads it instead of compiling
    it again (slow for the larger backbones). Trials of one backbone, image size, batch size and
    unfreeze depth do: learning rates are optimizer variables, the dropout rate a
    `fer.model.layers.HeadDropout` variable and label smoothing is in the targets
    (docs/pitfalls.md#baked-constants; benchmarks/compile_reuse.py). Every program is cached,
    however fast it compiled (minimum compile time and entry size 0). A no-op for TensorFlow, whose
    graphs are not compiled ahead. Safe to call again; returns the folder used, or None."""
    if backend_name() != "jax":
        return None
    import jax

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != folder:
        if jax.config.jax_compilation_cache_dir:
            log.info(
                "JAX compilation cache moves from %s to %s",
                jax.config.jax_compilation_cache_dir,
                folder,
            )
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        try:  # JAX opens its cache once, at the first compile: make it open the new folder
            from jax._src import compilation_cache

            compilation_cache.reset_cache()
        except Exception as exc:  # noqa: BLE001 - private API moved: the first folder stays in use
            log.warning("could not reset JAX's compilation cache (%s)", exc)
    return folder


def release_traced_graphs() -> int:
    """Between trials in a reused worker (fer.train.warm.fresh_keras_state): let the previous
    trials' traced TensorFlow graphs be freed. Returns how many registrations were dropped (0 for
    other backends).

    Why (docs/pitfalls.md#custom-gradient-leak): every `tf.function` trace of a Keras train step
    runs the optimizer's gradient all-reduce, a graph-mode `tf.custom_gradient`, which registers a
    gradient function named `CustomGradient-<uid>` in TensorFlow's process-wide gradient registry
    and never removes it. That function's closure holds the traced FuncGraph (every op and tensor of
    the step), so each compiled train step stays in memory for the life of the process: a worker
    that runs many trials grows with each (benchmarks/worker_memory.py). The registrations are only
    needed while a graph is being differentiated, i.e. during a trace; a step an earlier trial
    traced is either gone with its model or, put back by fer/train/stage_programs.py, run as already
    traced, so they can go. Private TensorFlow API: if it moved, nothing is dropped (a warning)."""
    if backend_name() != "tensorflow" or "tensorflow" not in sys.modules:
        return 0
    try:
        from tensorflow.python.framework import ops

        registry = ops._gradient_registry._registry
        stale = [name for name in registry if name.startswith("CustomGradient-")]
        for name in stale:
            del registry[name]
    except Exception as exc:  # noqa: BLE001 - a memory optimisation, never fatal
        log.warning(
            "could not release traced TensorFlow graphs (%s); a reused worker's memory will grow",
            exc,
        )
        return 0
    return len(stale)


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


def backend_gpu_count() -> int:
    """GPUs the Keras backend can compute on in this process (0 for a CPU-only build)."""
    name = backend_name()
    if name == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if name == "jax":
        import jax

        return len([d for d in jax.devices() if d.platform == "gpu"])
    if name == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def batch_train_step(model):
    """A function that runs `model`'s compiled train step on one batch of numpy arrays and
    returns its logs, fed without tf.data; None where `fit` needs no such thing.

    Why: under TensorFlow, `fit` over a PyDataset builds a tf.data pipeline per epoch and tears it
    down at the epoch's end, waiting on the prefetch thread that runs the batches: with two trials
    on two cores a core then sits idle (docs/benchmarks.md, idle cores). Keras's TensorFlow
    `train_function` also takes a plain Python iterator (what `train_on_batch` gives it): the same
    traced step, without the pipeline. Under JAX `fit` iterates a PyDataset in the calling
    thread (no pipeline, no prefetch thread), so it keeps `fit`.
    """
    if backend_name() != "tensorflow":
        return None
    import tensorflow as tf

    model.make_train_function()

    def step(batch):
        # map_structure keeps a multi-input model's inputs a tuple (FeatureViews' cached features)
        return model.train_function(iter([tf.nest.map_structure(tf.convert_to_tensor, batch)]))

    return step
