"""The accelerator path's decisions: which mixed precision `auto` picks, and where compiled programs are cached."""

import keras
import pytest

from fer import backend_setup
from fer.config import make_config
from fer.training import _dtype_policy


def test_auto_mixed_precision_is_float32_without_an_accelerator():
    assert not backend_setup.accelerator_available()  # the test machines have no GPU
    assert backend_setup.mixed_precision_dtype() is None
    assert _dtype_policy(make_config(mixed_precision="auto")) == "float32"
    assert _dtype_policy(make_config(mixed_precision="bfloat16")) == "mixed_bfloat16"
    assert _dtype_policy(make_config(mixed_precision="off")) == "float32"


@pytest.mark.parametrize("capability, expected", [((7, 5), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16"),
                                                  (None, "bfloat16")])
def test_auto_mixed_precision_by_gpu_generation(monkeypatch, capability, expected):
    # what a GPU would report: only the device query is replaced, the rule is the real one
    monkeypatch.setattr(backend_setup, "accelerator_available", lambda: True)
    monkeypatch.setattr(backend_setup, "_gpu_compute_capability", lambda: capability)
    assert backend_setup.mixed_precision_dtype() == expected
    assert _dtype_policy(make_config(mixed_precision="auto")) == f"mixed_{expected}"


def test_compilation_cache_only_for_jax(tmp_path):
    folder = tmp_path / "compile_cache"
    result = backend_setup.enable_compilation_cache(folder)
    if keras.backend.backend() == "jax":
        import jax

        assert result == str(folder) and folder.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(folder)
    else:  # TensorFlow compiles nothing ahead: nothing to cache, nothing written
        assert result is None and not folder.exists()
