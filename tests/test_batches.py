"""The input pipeline (fer/data/batches.py): batch-by-batch prediction gives model.predict's
numbers. Real Keras, tiny model."""

from __future__ import annotations

import keras
import numpy as np

from fer.data.batches import predict_probs


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.CategoricalCrossentropy())
    return model


def _data(n: int = 50):
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8), rng.integers(0, 3, n)


def test_batch_by_batch_prediction_equals_model_predict():
    pixels, _ = _data(21)  # not a multiple of the batch: the padded last batch is trimmed
    model = _tiny_model()
    expected = model.predict(pixels, batch_size=8, verbose=0)
    np.testing.assert_allclose(predict_probs(model, pixels, 8), expected, rtol=1e-6, atol=1e-7)
    assert predict_probs(model, pixels[:0], 8).shape == (0, 3)
