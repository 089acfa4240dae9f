"""Issue 12: warm trials that stay small and share compiled steps.

- memory: a process that runs trial after trial (a warm study worker) keeps no traced graph of an
  earlier trial (`fresh_keras_state` -> `fer.runtime.backend.release_traced_graphs`);
- one program per backbone, size and unfreeze depth: the dropout rate is a variable
  (`fer.model.layers.HeadDropout`) and label smoothing is in the targets
  (`fer.data.batches.smooth_targets`), with the SAME numbers as Keras's Dropout and
  CategoricalCrossentropy(label_smoothing) for the same seed (so results do not change);
- under JAX a later trial with other dropout / label smoothing / learning rates compiles nothing
  new.
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pandas as pd
import pytest

from fer.core.config import make_config
from fer.data.batches import smooth_targets
from fer.model.layers import HeadDropout
from fer.train.trial import run_trial
from fer.train.warm import fresh_keras_state

RATES = (0.0, 0.1, 0.37, 0.53, 0.9)
COMPARED = ["loss", "accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr"]
TINY = dict(
    backbone="smallcnn",
    image_size=48,
    weights="none",
    batch_size=16,
    dense_units=16,
    augment=0.0,
    patience=5,
)


def _draws(rate: float, calls: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    x = np.random.default_rng(0).normal(size=(16, 24)).astype("float32")
    stock, ours = keras.layers.Dropout(rate, seed=7), HeadDropout(rate, seed=7)
    run = [
        keras.ops.convert_to_numpy(layer(x, training=True))
        for _ in range(calls)
        for layer in (stock,)
    ]
    mine = [keras.ops.convert_to_numpy(ours(x, training=True)) for _ in range(calls)]
    return run, mine


@pytest.mark.parametrize("rate", RATES)
def test_head_dropout_drops_exactly_what_keras_dropout_drops(rate):
    stock, ours = _draws(rate)
    for a, b in zip(stock, ours, strict=True):
        assert np.array_equal(a, b)
    x = np.ones((4, 3), "float32")
    assert np.array_equal(keras.ops.convert_to_numpy(HeadDropout(rate)(x, training=False)), x)


def test_head_dropout_rate_is_a_variable_and_survives_saving(tmp_path):
    inputs = keras.Input((6,))
    layer = HeadDropout(0.3, seed=1, name="head_dropout")
    model = keras.Model(inputs, layer(inputs))
    assert len(layer.non_trainable_weights) == 3 and not layer.trainable_weights
    layer.set_rate(0.6)
    values = {v.name: float(keras.ops.convert_to_numpy(v)) for v in layer.non_trainable_weights}
    assert values == pytest.approx({"rate": 0.6, "keep": 0.4, "scale": 1 / 0.4}, rel=1e-7)
    model.save(tmp_path / "m.keras")
    from fer.model.build import load_trained_model

    loaded = load_trained_model(tmp_path / "m.keras").get_layer("head_dropout")
    assert isinstance(loaded, HeadDropout) and loaded.rate == pytest.approx(0.6)
    assert float(keras.ops.convert_to_numpy(loaded.non_trainable_weights[0])) == pytest.approx(0.6)


@pytest.mark.parametrize("smoothing", [0.0, 0.05, 0.1, 0.3, 0.5])
def test_smoothed_targets_give_the_loss_of_keras_label_smoothing(smoothing):
    rng = np.random.default_rng(1)
    onehot = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 32)]
    probs = rng.dirichlet(np.ones(5), 32).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, 32).astype(np.float32)
    stock = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)(
        onehot, probs, sample_weight=weights
    )
    ours = keras.losses.CategoricalCrossentropy()(
        smooth_targets(onehot, smoothing), probs, sample_weight=weights
    )
    assert float(keras.ops.convert_to_numpy(ours)) == float(keras.ops.convert_to_numpy(stock))
    assert smooth_targets(onehot, 0.0) is onehot


def _stock_keras(monkeypatch, smoothing: float) -> None:
    """The model and loss as before issue 12: Keras's Dropout, label smoothing inside the loss."""
    import fer.data.batches
    import fer.model.build
    import fer.train.trial

    monkeypatch.setattr(
        fer.model.build, "HeadDropout", lambda rate, name: keras.layers.Dropout(rate, name=name)
    )
    monkeypatch.setattr(fer.data.batches, "smooth_targets", lambda onehot, s: onehot)
    stock_loss = keras.losses.CategoricalCrossentropy

    class SmoothedLoss(stock_loss):
        def __init__(self, *args, **kwargs):
            kwargs["label_smoothing"] = smoothing
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fer.train.trial.keras.losses, "CategoricalCrossentropy", SmoothedLoss)


@pytest.mark.parametrize("dropout,smoothing", [(0.4, 0.1), (0.0, 0.0)])
def test_a_trial_repeats_the_stock_keras_trial_of_the_same_seed(
    prepared_data, tmp_path, monkeypatch, dropout, smoothing
):
    """Same config and seed: the variable dropout and the smoothed targets give the epochs (and the
    weights) of Keras's own layers, so results from before this change stay comparable. Rate 0 too
    (its seed generator must not shift the head's initial weights)."""
    config = dict(TINY, epochs_head=2, epochs_finetune=1, unfreeze_layers=4, dropout=dropout)
    config["label_smoothing"] = smoothing
    run_trial(config, prepared_data, tmp_path / "new")
    with monkeypatch.context() as patch:
        _stock_keras(patch, smoothing)
        run_trial(config, prepared_data, tmp_path / "stock")
    new, stock = (pd.read_csv(tmp_path / name / "history.csv") for name in ("new", "stock"))
    pd.testing.assert_frame_equal(
        new[COMPARED], stock[COMPARED], check_exact=False, atol=1e-6, rtol=0
    )
    from fer.model.build import load_trained_model

    a, b = (load_trained_model(tmp_path / name / "model.keras") for name in ("new", "stock"))
    for layer in b.layers:
        for wa, wb in zip(a.get_layer(layer.name).get_weights(), layer.get_weights(), strict=False):
            np.testing.assert_allclose(wa, wb, atol=1e-6, rtol=0)


def test_frozen_layers_stay_bit_identical_through_both_stages(prepared_data, tmp_path):
    from fer.model.build import (
        backbone_layers,
        build_model,
        last_backbone_layers,
        load_trained_model,
    )

    config = dict(
        TINY, epochs_head=1, epochs_finetune=2, unfreeze_layers=3, dropout=0.3, label_smoothing=0.1
    )
    initial = build_model(
        make_config(config), len(prepared_data.classes)
    )  # same seed: the trial's start
    unfrozen = {layer.name for layer in last_backbone_layers(initial, 3)}
    frozen = [
        layer.name
        for layer in backbone_layers(initial)
        if layer.name not in unfrozen and layer.weights
    ]
    start = {name: [w.copy() for w in initial.get_layer(name).get_weights()] for name in frozen}
    fresh_keras_state()
    run_trial(config, prepared_data, tmp_path)
    trained = load_trained_model(tmp_path / "model.keras")
    assert frozen and unfrozen
    for name in frozen:
        for before, after in zip(start[name], trained.get_layer(name).get_weights(), strict=True):
            assert np.array_equal(before, after), name
    changed = [
        name
        for name in unfrozen
        if initial.get_layer(name).weights
        and not all(
            np.array_equal(a, b)
            for a, b in zip(
                initial.get_layer(name).get_weights(),
                trained.get_layer(name).get_weights(),
                strict=True,
            )
        )
    ]
    assert changed  # the unfrozen range did train


def test_a_kept_model_repeats_a_freshly_built_one(prepared_data, tmp_path):
    """reuse_model (warm workers): a trial of another dropout, label smoothing and learning rates
    trains the kept model; the next trial with the first config restores its initial state (weights,
    BN statistics, dropout and augmentation seed states, global random states) and repeats the
    freshly built run."""
    first = dict(
        TINY, epochs_head=2, epochs_finetune=1, unfreeze_layers=4, augment=0.3, dropout=0.3
    )
    first["label_smoothing"] = 0.1
    other = dict(first, dropout=0.6, label_smoothing=0.0, lr_head=3e-3, lr_finetune=1e-5)
    fresh_keras_state()
    fresh = run_trial(first, prepared_data, tmp_path / "fresh")
    fresh_keras_state()
    assert not run_trial(other, prepared_data, tmp_path / "other", reuse_model=True)["model_reused"]
    fresh_keras_state()
    again = run_trial(first, prepared_data, tmp_path / "again", reuse_model=True)
    assert again["model_reused"] and not fresh["model_reused"]
    # the same trainable layers in both stages: the earlier trial's compiled stages were put back
    # (fer/train/stage_programs.py) and the numbers still match the fresh trial's
    assert again["compiled_stage_reused"] == {"head": True, "finetune": True}
    a, b = (pd.read_csv(tmp_path / name / "history.csv") for name in ("fresh", "again"))
    pd.testing.assert_frame_equal(a[COMPARED], b[COMPARED], check_exact=False, atol=1e-6, rtol=0)
    fresh_keras_state()  # another seed builds the model anew
    assert not run_trial(dict(first, seed=3), prepared_data, tmp_path / "seed3", reuse_model=True)[
        "model_reused"
    ]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow registry")
def test_fresh_keras_state_frees_the_traced_steps_of_earlier_trials():
    """TensorFlow registers a gradient function per traced train step (the optimizer's all-reduce, a
    graph-mode custom_gradient) that keeps the whole traced graph alive; between trials they must
    go."""
    from tensorflow.python.framework import ops
    from tensorflow.python.framework.func_graph import FuncGraph

    def fit_once():
        inputs = keras.Input((8,))
        model = keras.Model(
            inputs, keras.layers.Dense(3, activation="softmax")(HeadDropout(0.2)(inputs))
        )
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy()
        )
        model.fit(
            np.ones((8, 8), "float32"), np.eye(3, dtype="float32")[np.arange(8) % 3], verbose=0
        )

    def graphs():
        gc.collect()
        return sum(isinstance(o, FuncGraph) for o in gc.get_objects())

    counts = []
    for _ in range(3):
        fresh_keras_state()
        counts.append(graphs())
        fit_once()
        assert any(name.startswith("CustomGradient-") for name in ops._gradient_registry._registry)
    fresh_keras_state()
    counts.append(graphs())
    assert not any(name.startswith("CustomGradient-") for name in ops._gradient_registry._registry)
    assert counts[1] == counts[2] == counts[3], counts  # nothing of an earlier trial's graphs stays


_JAX_TWO_TRIALS = r"""
import json, sys
from pathlib import Path
import numpy as np, keras
from fer.data import StudyData
from fer.model.layers import HeadDropout
from fer.train.trial import run_trial
from fer.train.warm import fresh_keras_state

x = np.random.default_rng(0).normal(size=(16, 24)).astype("float32")
same = []
for rate in (0.0, 0.37, 0.9):
    a, b = keras.layers.Dropout(rate, seed=7), HeadDropout(rate, seed=7)
    for _ in range(2):
        ya, yb = np.asarray(a(x, training=True)), np.asarray(b(x, training=True))
        same.append(bool(np.array_equal(ya, yb)))
print(json.dumps({"backend": keras.backend.backend(), "dropout_same": same}))
data, out = StudyData(sys.argv[1]), Path(sys.argv[2])
cache = Path(sys.argv[1]).parent / "compile_cache"
base = dict(backbone="smallcnn", image_size=48, weights="none", batch_size=16, dense_units=16,
            augment=0.0, epochs_head=1, epochs_finetune=1, unfreeze_layers=4)
varied = [dict(dropout=0.2, label_smoothing=0.05, lr_head=1e-3, lr_finetune=1e-4, seed=0),
          dict(dropout=0.5, label_smoothing=0.1, lr_head=3e-3, lr_finetune=3e-5, seed=1)]
files = []
for i, v in enumerate(varied):
    if i:
        fresh_keras_state()
    run_trial({**base, **v}, data, out / f"t{i}")
    files.append(sorted(p.name for p in cache.iterdir()))
steps = [name for name in files[0] if "step" in name]
new = sorted(set(files[1]) - set(files[0]))
print(json.dumps({"files": [len(f) for f in files], "new": new, "steps": steps}))
"""


@pytest.mark.slow
def test_under_jax_a_later_trial_with_other_hyperparameters_compiles_nothing_new(
    prepared_data, tmp_path, run_under_jax
):
    """Two trials of one backbone, size and depth, with other dropout, label smoothing, learning
    rates and seed, in one JAX process: the second finds every program it runs in the study's
    compilation cache (both with some label smoothing: the eager val-loss smoothing ops run only
    then). Also checks HeadDropout against Keras's Dropout under JAX."""
    import shutil

    data = tmp_path / "results" / "s" / "data"
    shutil.copytree(prepared_data.dir, data)
    lines = run_under_jax(_JAX_TWO_TRIALS, data, tmp_path / "trials", JAX_PLATFORMS="cpu")
    assert lines[0]["backend"] == "jax" and all(lines[0]["dropout_same"])
    assert len(lines[1]["steps"]) >= 3, lines[
        1
    ]  # train steps of both stages and the predict step are cached
    assert lines[1]["new"] == [], lines[1]
