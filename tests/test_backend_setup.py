"""Backend set-up decisions (fer.runtime.backend): which mixed precision `auto` picks on which
device, and where compiled programs are cached. Runs on any machine: a GPU is simulated where the
rule needs one."""

import json
import os
import subprocess
import sys

import keras
import pytest

from fer.core.config import make_config
from fer.runtime import backend as backend_setup
from fer.train.warm import trial_dtype_policy


def test_auto_mixed_precision_is_float32_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(backend_setup, "accelerator_available", lambda: False)
    assert backend_setup.mixed_precision_dtype() is None
    assert trial_dtype_policy(make_config(mixed_precision="auto")) == "float32"
    assert trial_dtype_policy(make_config(mixed_precision="bfloat16")) == "mixed_bfloat16"
    assert trial_dtype_policy(make_config(mixed_precision="off")) == "float32"


def test_auto_mixed_precision_matches_this_machine():
    # no simulation: on a CPU-only machine float32, on a GPU one of the mixed policies
    dtype = backend_setup.mixed_precision_dtype()
    if backend_setup.accelerator_available():
        assert dtype in ("float16", "bfloat16")
    else:
        assert dtype is None


@pytest.mark.parametrize(
    "capability, expected",
    [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16"), (None, "bfloat16")],
)
def test_auto_mixed_precision_by_gpu_generation(monkeypatch, capability, expected):
    # what a GPU would report: only the device query is replaced, the rule is the real one
    monkeypatch.setattr(backend_setup, "accelerator_available", lambda: True)
    monkeypatch.setattr(backend_setup, "_gpu_compute_capability", lambda: capability)
    assert backend_setup.mixed_precision_dtype() == expected
    assert trial_dtype_policy(make_config(mixed_precision="auto")) == f"mixed_{expected}"


def test_compilation_cache_only_for_jax(tmp_path):
    folder = tmp_path / "compile_cache"
    result = backend_setup.enable_compilation_cache(folder)
    if keras.backend.backend() == "jax":
        import jax

        assert result == str(folder) and folder.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(folder)
    else:  # TensorFlow compiles nothing ahead: nothing to cache, nothing written
        assert result is None and not folder.exists()


PROBE_LEAN_IMPORT = """
import importlib.util, json, os, sys
from study.tune.trainable import (
    import_keras_lean, HIDDEN_AT_KERAS_IMPORT, HIDDEN_UNLESS_JAX_BACKEND)
import_keras_lean()
import keras
hidden = HIDDEN_AT_KERAS_IMPORT + HIDDEN_UNLESS_JAX_BACKEND
loaded = [name for name in hidden if name in sys.modules]
installed = [name for name in hidden if importlib.util.find_spec(name) is not None]
for name in installed:
    __import__(name)  # still importable afterwards
print(json.dumps({"backend": keras.backend.backend(), "loaded": loaded, "installed": installed}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_trial_worker_imports_keras_without_the_optional_packages_it_never_uses(backend):
    """study.tune.trainable.import_keras_lean: a trial worker's Keras import leaves out
    scikit-learn, IPython, matplotlib and (unless the backend is JAX) JAX, ~1.2 s of every worker's
    start, and they stay importable."""
    if backend == "jax":
        pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE_LEAN_IMPORT], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    expected_loaded = ["jax", "jaxlib"] if backend == "jax" else []
    assert result["loaded"] == [name for name in expected_loaded if name in result["installed"]]
