"""Refuse a silent CPU fallback: GPUs that a trial asks for (or the machine has) but the backend
cannot use.

`pip install -e ".[jax]"` installs a CPU-only JAX and `.[cpu]` a CPU-only TensorFlow; on a GPU
workstation either trains for hours on the CPU without a word. `fer-study run` asks one Ray task
holding the trial's GPU share what the backend sees there (so the check is made where trials run,
also on a cluster); `fer-study train` compares the machine's NVIDIA GPUs with the backend's devices.
Both stop with one line that names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from fer.core.errors import UserError

FIXES = {
    "jax": 'pip install -e ".[jax-cuda]" (JAX with CUDA 12)',
    "tensorflow": 'pip install -e ".[gpu]" (TensorFlow with CUDA)',
}


def system_gpu_count() -> int:
    """NVIDIA GPUs this process may use according to the driver (and CUDA_VISIBLE_DEVICES), 0
    without one."""
    root = Path("/proc/driver/nvidia/gpus")
    count = len(list(root.iterdir())) if root.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return count


def check_backend_gpus(wanted: float, usable: int, backend: str, where: str, cpu_hint: str) -> None:
    """Raise a one-line UserError when `wanted` GPUs (> 0) meet a backend that can use none."""
    if wanted > 0 and usable == 0:
        fix = FIXES.get(backend, "install the GPU build of the Keras backend")
        raise UserError(
            f"{where} but the Keras backend '{backend}' sees no GPU, so trials would run on the "
            f"CPU: {fix}, or {cpu_hint} to train on the CPU on purpose"
        )
