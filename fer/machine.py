"""A description of the machine and software versions, for study.json and benchmark JSON lines.

Numbers without the machine they were measured on are not worth much; every benchmark and every study
records this.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

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
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


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


SHARED_ENV = "FER_SHARED"
SHARED_DOWNLOADS = {
    "datasets/fer2013-5class": "FER2013 (research use only) as 48x48 JPEGs in five class folders angry, fear, "
    "happy, sad, surprise, file names keeping the official split prefixes Training_, "
    "PublicTest_, PrivateTest_",
    "datasets/jaffe-5class": "JAFFE (non-commercial research only) as PNGs in the same five class folders, "
    "file names <SUBJECT>_<EXPR><take>_<n>.png",
    "weights": "the offline ImageNet weight file (docs/benchmarks.md names each file and where it comes from)",
}


def shared_path(*parts: str) -> Path:
    """A path under the folder that holds the real datasets and offline weights used by benchmarks and data
    tests (never by the product): `$FER_SHARED`, default `../shared` beside the repository. See
    docs/benchmarks.md for its layout and where to get each part."""
    root = os.environ.get(SHARED_ENV) or Path(__file__).resolve().parents[2] / "shared"
    return Path(root).joinpath(*parts)


def shared_missing(path) -> str:
    """The one-line explanation for a missing shared file or folder: what it is and how to provide it."""
    root = shared_path()
    try:
        rel = Path(path).relative_to(root).as_posix()
    except ValueError:
        rel = str(path)
    what = next((text for key, text in SHARED_DOWNLOADS.items() if rel.startswith(key)), "a shared data file")
    return (
        f"{path} not found: put {what} there, or set {SHARED_ENV} to the folder that holds datasets/ and "
        f"weights/ (docs/benchmarks.md)"
    )
