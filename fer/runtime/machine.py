"""A description of the machine and software versions, for study.json and benchmark JSON lines.

Numbers without the machine they were measured on are not worth much; every benchmark and every
study records this.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

_PACKAGES = (
    "keras",
    "tensorflow",
    "tensorflow-cpu",
    "jax",
    "jaxlib",
    "ray",
    "optuna",
    "numpy",
    "pandas",
    "scikit-learn",
    "pillow",
    "pillow-heif",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        return None


def _gpus() -> list[str]:
    """GPU names from nvidia-smi, without importing any framework (cheap, backend-neutral)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return (
        [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0
        else []
    )


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def machine_info() -> dict:
    """CPU model, cores, memory, GPUs, Python, Keras backend and the main package versions."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "packages": package_versions(),
    }
