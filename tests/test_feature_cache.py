"""Frozen-feature caches: computed once across processes, cached trials end to end, cache ==
recomputation, the stage-2 cut (residual blocks cut in the middle) reproducing the full model."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fer.core.files import create_or_wait

REPO = Path(__file__).resolve().parents[1]

# Two processes race for the same result; each records whether it computed. Pure Python (no Keras
# import), so the race is real: both start polling within milliseconds of each other.
_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from fer.core.files import create_or_wait
    folder = Path(sys.argv[1])
    while time.time() < float(sys.argv[2]):  # start together
        time.sleep(0.001)

    def compute(beat):
        with open(folder / "computations.txt", "a") as f:
            f.write("x\\n")
        for _ in range(10):
            time.sleep(0.1)
            beat()
        (folder / "result.txt").write_text("done")

    print(create_or_wait(folder / "result.txt", folder / "result.lock", compute, poll_s=0.05))
""")


def test_two_processes_asking_at_once_compute_once(tmp_path):
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), str(start)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["False", "True"]  # one computed, the other waited for it
    assert (tmp_path / "computations.txt").read_text() == "x\n"
    assert (tmp_path / "result.txt").read_text() == "done"
    assert not (tmp_path / "result.lock").exists()


def test_stale_lock_is_broken_and_failed_compute_releases_the_lock(tmp_path):
    lock, marker = tmp_path / "r.lock", tmp_path / "r.done"
    lock.write_text('{"host": "gone", "pid": 1}')
    old = time.time() - 1000
    os.utime(lock, (old, old))  # its owner died long ago

    def fail(beat):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        create_or_wait(marker, lock, fail, stale_s=60, poll_s=0.01)
    assert not lock.exists()  # a failure does not leave waiters hanging
    assert create_or_wait(marker, lock, lambda beat: marker.write_text("ok"), stale_s=60) is True
    assert (
        create_or_wait(marker, lock, lambda beat: pytest.fail("computed twice"), stale_s=60)
        is False
    )


def _config(**overrides):
    from fer.core.config import make_config

    base = dict(
        backbone="mobilenet025",
        image_size=32,
        weights="none",
        batch_size=8,
        epochs_head=2,
        epochs_finetune=0,
        patience=3,
        head_features="cached",
        feature_views=2,
    )
    return make_config({**base, **overrides})


@pytest.mark.slow
def test_cached_head_stage_end_to_end(new_study):
    """Two trials share one feature computation; the head trained on features is the full model's
    head."""
    import keras

    from fer.data import StudyData
    from fer.data.batches import predict_probs
    from fer.model.build import build_model, load_trained_model
    from fer.train.feature_cache import features_dir
    from fer.train.feature_compute import compute_features
    from fer.train.feature_models import head_extractor
    from fer.train.trial import run_trial

    study = new_study("cached")
    data = StudyData(study / "data")
    first = run_trial(_config(), data, study / "t1")
    assert (
        first["feature_cache"]["head"]["computed"] is True
        and first["feature_cache"]["head"]["views"] == 2
    )
    for name in ("config.json", "history.csv", "model.keras", "val_metrics.json", "summary.json"):
        assert (study / "t1" / name).is_file(), name
    history = pd.read_csv(study / "t1" / "history.csv")
    assert list(history.stage) == ["head", "head"] and history.val_loss.notna().all()
    # the saved model is the FULL model (image in, probabilities out), and its val loss is the one
    # recorded for the best head epoch: the head-only model really trained the full model's head
    # layers
    model = load_trained_model(study / "t1" / "model.keras")
    assert model.input_shape == (None, 32, 32, 3)
    probs = predict_probs(model, data.pixels("val", 32), 8)
    loss = keras.losses.CategoricalCrossentropy()(
        np.eye(len(data.classes))[data.labels("val")], probs
    )
    assert float(loss) == pytest.approx(history.val_loss.min(), rel=1e-4)
    assert json.loads((study / "t1" / "val_metrics.json").read_text())["val_loss"] == pytest.approx(
        history.val_loss.min(), rel=1e-4
    )

    # another trial with other head hyperparameters (and stage 2) reuses the same features
    second = run_trial(_config(dropout=0.2, dense_units=16, epochs_finetune=1), data, study / "t2")
    assert second["feature_cache"]["head"]["computed"] is False
    assert second["feature_cache"]["head"]["key"] == first["feature_cache"]["head"]["key"]
    assert list(pd.read_csv(study / "t2" / "history.csv").stage) == ["head", "head", "finetune"]
    key = first["feature_cache"]["head"]["key"]
    assert sorted(p.name for p in features_dir(data).iterdir()) == [
        f"{key}.json",
        f"{key}.train.0.npy",
        f"{key}.val.0.npy",
    ]

    # cached features equal a fresh computation with the same key
    [train], [val] = compute_features(
        head_extractor(build_model(_config(), len(data.classes))), _config(), data
    )
    cached_train = np.load(features_dir(data) / f"{key}.train.0.npy")
    assert cached_train.shape == (2, len(data.labels("train")), train.shape[-1])
    scale = np.abs(
        train
    ).max()  # features of an untrained backbone are tiny: compare relative to their scale
    assert (
        np.abs(cached_train[0] - cached_train[1]).max() > 1e-2 * scale
    )  # two different augmented views
    np.testing.assert_allclose(cached_train, train, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(
        np.load(features_dir(data) / f"{key}.val.0.npy"),
        val,
        rtol=1e-5,
        atol=1e-6 * np.abs(val).max(),
    )


def test_cut_inside_a_residual_block_reproduces_the_full_model():
    """The stage-2 cut: prefix then tail == the full model (inference), with two tensors crossing
    the cut."""
    from fer.model.backbones import get_backbone
    from fer.model.build import build_model, set_stage
    from fer.train.feature_models import split_at_tail

    config = _config(backbone="mobilenetv2", augment=0.0)
    model = build_model(config, 5)
    # MobileNetV2's last 12 layers start inside block 15, whose output adds the block's input (a
    # skip)
    prefix, tail, cut = split_at_tail(model, 12)
    assert cut.startswith("block_15")
    assert len(prefix.outputs) == 2
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    np.testing.assert_allclose(
        np.asarray(tail(prefix(images))), np.asarray(model(images)), rtol=1e-5, atol=1e-6
    )
    set_stage(model, "finetune", 8, "layers", get_backbone("mobilenetv2"))
    assert {id(w) for w in tail.trainable_weights} == {id(w) for w in model.trainable_weights}


@pytest.mark.slow
def test_cached_finetune_stage_trains_the_full_model_and_is_shared(new_study):
    """Two trials with different unfreeze_layers share one stage-2 cache (cut at
    finetune_cache_units); the tail model really trained the full model (its saved val loss is the
    recorded best), and the layers before the cut never changed."""
    import keras

    from fer.core.errors import UserError
    from fer.data import StudyData
    from fer.data.batches import predict_probs
    from fer.model.build import build_model, load_trained_model
    from fer.train.trial import run_trial

    study = new_study("cached_finetune")
    data = StudyData(study / "data")
    base = dict(
        backbone="mobilenetv2",
        epochs_head=0,
        epochs_finetune=2,
        head_features="exact",
        finetune_features="cached",
        finetune_cache_units=12,
        lr_finetune=1e-3,
    )
    first = run_trial(_config(**base, unfreeze_layers=12), data, study / "t1")
    second = run_trial(_config(**base, unfreeze_layers=6, seed=0, dropout=0.2), data, study / "t2")
    cache1, cache2 = first["feature_cache"]["finetune"], second["feature_cache"]["finetune"]
    assert (
        cache1["computed"] is True
        and cache2["computed"] is False
        and cache1["key"] == cache2["key"]
    )
    assert second["trainable_layers"]["finetune"] < first["trainable_layers"]["finetune"]

    history = pd.read_csv(study / "t1" / "history.csv")
    assert list(history.stage) == ["finetune", "finetune"]
    trained = load_trained_model(study / "t1" / "model.keras")
    probs = predict_probs(trained, data.pixels("val", 32), 8)
    loss = keras.losses.CategoricalCrossentropy()(
        np.eye(len(data.classes))[data.labels("val")], probs
    )
    assert float(loss) == pytest.approx(history.val_loss.min(), rel=1e-4)

    untrained = build_model(_config(**base, unfreeze_layers=12), len(data.classes))
    changed = [
        layer.name
        for layer in untrained.layers
        if layer.weights
        and any(
            not np.allclose(a, b)
            for a, b in zip(layer.get_weights(), trained.get_layer(layer.name).get_weights())
        )
    ]
    assert changed and all(
        name.startswith(("block_15", "block_16", "Conv_1", "head_")) for name in changed
    )

    # with both caches, the head features come from the stage-2 cache (the frozen tail on the same
    # views): the same values as from the images
    from fer.train.feature_cache import features_dir
    from fer.train.feature_compute import compute_features
    from fer.train.feature_models import head_extractor

    both = _config(**{**base, "head_features": "cached", "epochs_head": 1}, unfreeze_layers=12)
    third = run_trial(both, data, study / "t3")
    assert (
        third["feature_cache"]["finetune"]["computed"] is False
        and third["feature_cache"]["head"]["computed"]
    )
    [from_images], [val_from_images] = compute_features(
        head_extractor(build_model(both, len(data.classes))), both, data
    )
    key = third["feature_cache"]["head"]["key"]
    scale = np.abs(from_images).max()
    np.testing.assert_allclose(
        np.load(features_dir(data) / f"{key}.train.0.npy"),
        from_images,
        rtol=1e-4,
        atol=1e-5 * scale,
    )
    np.testing.assert_allclose(
        np.load(features_dir(data) / f"{key}.val.0.npy"),
        val_from_images,
        rtol=1e-4,
        atol=1e-5 * scale,
    )

    with pytest.raises(UserError, match="finetune_cache_units 6 is below unfreeze_layers 12"):
        run_trial(
            _config(**{**base, "finetune_cache_units": 6}, unfreeze_layers=12), data, study / "t4"
        )


def test_a_cache_the_disk_cannot_hold_is_refused_before_computing(new_study, monkeypatch):
    import shutil
    from collections import namedtuple

    from fer.core.errors import UserError
    from fer.data import StudyData
    from fer.model.build import build_model
    from fer.train.feature_cache import features_dir, stage_features

    data = StudyData(new_study("full_disk") / "data")
    config = _config(finetune_features="cached", unfreeze_layers=4, epochs_finetune=1)
    model = build_model(config, len(data.classes))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        UserError, match=r"finetune feature cache needs .* GiB free; use fewer feature_views"
    ):
        stage_features(model, "finetune", config, data, "float32")
    assert not any(p.suffix == ".npy" for p in features_dir(data).iterdir())  # nothing half-written
    assert not any(
        p.suffix == ".lock" for p in features_dir(data).iterdir()
    )  # and the lock released
