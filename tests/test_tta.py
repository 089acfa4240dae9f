"""Test-time mirroring (`tta_flip`): the mean of each image's and its mirror's softmax, wherever a
trained model is evaluated (per-epoch val, val_metrics.json, the test split, `evaluate`).

Real tiny Keras models on tiny images; the expected numbers are computed by hand from two plain
predictions (the image, then its mirror).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from fer.core.config import make_config
from fer.core.errors import UserError
from fer.data.batches import predict_probs


def _images(n: int = 10, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _model(symmetric: bool, size: int = 8) -> keras.Model:
    """Pooling over the whole image ignores left and right; a Dense layer over every pixel does
    not."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    if symmetric:
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(4, activation="softmax", kernel_initializer="he_normal")(x)
    return keras.Model(inputs, outputs)


def test_a_mirror_symmetric_model_predicts_the_same_with_and_without_mirroring():
    model, pixels = _model(symmetric=True), _images()
    plain = predict_probs(model, pixels, batch_size=4)
    np.testing.assert_allclose(predict_probs(model, pixels, 4, tta_flip=True), plain, atol=1e-6)


def test_mirroring_averages_the_image_and_its_mirror():
    model, pixels = _model(symmetric=False), _images()
    plain = predict_probs(model, pixels, batch_size=4)  # 10 images: the last batch is padded
    mirrored = predict_probs(model, np.ascontiguousarray(pixels[:, :, ::-1]), batch_size=4)
    assert np.abs(plain - mirrored).max() > 1e-3  # this model does tell left from right
    averaged = predict_probs(model, pixels, batch_size=4, tta_flip=True)
    np.testing.assert_allclose(averaged, (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(averaged.sum(axis=1), 1.0, atol=1e-5)


def test_mirroring_refuses_inputs_that_are_not_images():
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match="not images"):
        predict_probs(model, np.zeros((4, 6), np.float32), 2, tta_flip=True)


def test_the_key_validates():
    assert make_config()["tta_flip"] == 0
    assert make_config(tta_flip="1")["tta_flip"] == 1
    for bad in (2, -1, 0.5, "yes"):
        with pytest.raises(UserError, match="tta_flip"):
            make_config(tta_flip=bad)
    with pytest.raises(UserError, match="tta_flip 1 needs head_features exact"):
        make_config(tta_flip=1, head_features="cached")
    with pytest.raises(UserError, match="finetune_features exact"):
        make_config(tta_flip=1, finetune_features="cached")
    # a cached stage that does not run is no obstacle
    make_config(tta_flip=1, head_features="cached", epochs_head=0)


def test_a_trial_validates_tests_and_evaluates_with_the_mirror(prepared_data, tmp_path):
    """The per-epoch val pass (whose best epoch's predictions become val_metrics.json), the test
    split and `evaluate`'s predictor all average the mirror."""
    from fer.evaluate.predict import load_for_prediction
    from fer.model.build import load_trained_model
    from fer.train.trial import run_trial

    config = dict(
        backbone="smallcnn",
        image_size=32,
        weights="none",
        dense_units=16,
        batch_size=16,
        epochs_head=0,
        epochs_finetune=2,
        unfreeze_layers=200,
        lr_finetune=3e-3,
        tta_flip=1,
    )
    summary = run_trial(config, prepared_data, tmp_path, evaluate_test=True)
    model = load_trained_model(tmp_path / "model.keras")
    classes = list(prepared_data.classes)

    def by_hand(split: str) -> np.ndarray:
        pixels = prepared_data.pixels(split, 32)
        mirrored = np.ascontiguousarray(pixels[:, :, ::-1])
        return (predict_probs(model, pixels, 16) + predict_probs(model, mirrored, 16)) / 2

    val = by_hand("val")
    val_accuracy = float(np.mean(val.argmax(axis=1) == prepared_data.labels("val")))
    assert json.loads((tmp_path / "val_metrics.json").read_text())["accuracy"]["value"] == (
        pytest.approx(val_accuracy)
    )
    history = pd.read_csv(tmp_path / "history.csv")
    best = history.loc[history["epoch"] == summary["best_epoch"]].iloc[0]
    assert best["val_accuracy"] == pytest.approx(val_accuracy)  # the per-epoch pass mirrored
    stored = pd.read_csv(tmp_path / "test_predictions.csv")
    np.testing.assert_allclose(
        stored[[f"p_{c}" for c in classes]].to_numpy(), by_hand("test"), atol=1e-5
    )
    predict, *_ = load_for_prediction(tmp_path)
    test_pixels = prepared_data.pixels("test", 32)
    np.testing.assert_allclose(predict(test_pixels, 16), by_hand("test"), atol=1e-5)
