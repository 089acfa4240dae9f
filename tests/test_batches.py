"""The input pipeline (fer/batches.py): an endless stage serves the same batches as epoch-by-epoch
iteration, and batch-by-batch prediction gives model.predict's numbers. Real Keras, tiny model."""

from __future__ import annotations

import keras
import numpy as np

from fer.batches import FeatureViews, PixelBatches, predict_probs


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


def _fit_twice(endless: bool) -> list[np.ndarray]:
    """Two stages (two fits) over one PixelBatches, as run_trial does; the final weights."""
    pixels, labels = _data()
    batches = PixelBatches(pixels, 8, labels, 3, {0: 1.0, 1: 2.0, 2: 0.5}, shuffle_seed=3, label_smoothing=0.1)
    model = _tiny_model()
    for epochs in (2, 3):
        steps = {"steps_per_epoch": batches.endless()} if endless else {}
        model.fit(batches, epochs=epochs, verbose=0, shuffle=False, **steps)
    return model.get_weights()


def test_an_endless_stage_trains_on_the_same_batches_as_epoch_by_epoch_iteration():
    """One input iterator per stage (PixelBatches.endless) must not change what the model sees: the same
    batches, in the same order, across both stages, so the weights after two fits are identical."""
    for finite, endless in zip(_fit_twice(endless=False), _fit_twice(endless=True), strict=True):
        np.testing.assert_array_equal(finite, endless)


def test_an_endless_stage_reshuffles_every_epoch_and_drops_the_incomplete_batch():
    pixels, labels = _data(50)
    batches = PixelBatches(pixels, 8, labels, 3, None, shuffle_seed=0)
    assert batches.endless() == 6 and batches.num_batches is None  # 50 // 8; endless for Keras
    first = [batches[i][1].argmax(1) for i in range(6)]  # batch 0 fixes the epoch (epochs_done = 0)
    batches.on_epoch_end()
    again = [batches[i][1].argmax(1) for i in range(6)]  # a new fit's batch 0: the next epoch
    later = [batches[i][1].argmax(1) for i in range(6, 12)]  # the epoch after that, same fit
    assert not all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(again, later, strict=True))
    assert all(len(b) == 8 for b in first + again + later)


def test_feature_views_cycle_with_the_epoch_in_an_endless_stage():
    views = [np.stack([np.full((4, 2), v, np.float32) + np.arange(4)[:, None] for v in (0.0, 10.0)])]
    batches = FeatureViews(views, 2, np.arange(4) % 2, 2, None, shuffle_seed=0)
    steps = batches.endless()
    seen = [float(batches[i][0].min()) >= 10 for i in range(0, 3 * steps, steps)]  # view per epoch: 0, 1, 0
    assert seen == [False, True, False]


def test_batch_by_batch_prediction_equals_model_predict():
    pixels, _ = _data(21)  # not a multiple of the batch: the padded last batch is trimmed
    model = _tiny_model()
    expected = model.predict(pixels, batch_size=8, verbose=0)
    np.testing.assert_allclose(predict_probs(model, pixels, 8), expected, rtol=1e-6, atol=1e-7)
    assert predict_probs(model, pixels[:0], 8).shape == (0, 3)
