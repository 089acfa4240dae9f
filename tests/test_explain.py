"""fer.explain.map_checks: faithfulness both ways, the randomisation sanity check, the same-map
detector, the readable layer and region statistics, on tiny hand-built Keras models where the right
answer is known."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fer.explain.map_checks import (
    class_mean_maps,
    disagreements,
    faithfulness_curves,
    faithfulness_table,
    gradcam_maps,
    map_similarity,
    randomisation_check,
    readable_layer,
    region_stats,
    spearman_rows,
)

SIZE = 16


def _region_model() -> keras.Model:
    """Class 0's logit grows with the brightness of the top-left 8x8 corner; nothing else is looked
    at."""
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Cropping2D(((0, SIZE // 2), (0, SIZE // 2)), name="corner")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    out = keras.layers.Dense(2, activation="softmax", name="head_out")(x)
    model = keras.Model(inputs, out, name="corner_model")
    model.get_layer("head_out").set_weights(
        [np.array([[0.02, -0.02]] * 3, np.float32), np.array([-2.0, 2.0], np.float32)]
    )
    return model


def _corner_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, SIZE, SIZE, 3)).astype(np.float32)
    images[:, : SIZE // 2, : SIZE // 2] += 170  # a bright corner: class 0
    return images


def test_the_map_of_the_region_the_model_reads_beats_random_both_ways():
    model, images = _region_model(), _corner_images(24)
    right = np.zeros((24, SIZE, SIZE))
    right[:, : SIZE // 2, : SIZE // 2] = 1.0  # the true explanation
    wrong = 1.0 - right  # everything except what the model reads
    curves = faithfulness_curves(
        model, images, {"right": right, "wrong": wrong}, np.zeros(24, int), steps=8
    )
    rows = {(r["metric"], r["method"]): r for r in faithfulness_table(curves, n_boot=500)}
    assert (
        rows[("deletion", "right")]["vs random"]
        == "better"
        == rows[("insertion", "right")]["vs random"]
    )
    assert (
        rows[("deletion", "wrong")]["vs random"]
        == "worse"
        == rows[("insertion", "wrong")]["vs random"]
    )
    assert all(r["images"] == 24 for r in rows.values())
    # the curves start (deletion) and end (insertion) at the prediction
    p0 = model.predict(images, verbose=0)[:, 0]
    np.testing.assert_allclose(curves["deletion"]["right"][:, 0], p0, atol=1e-5)
    np.testing.assert_allclose(curves["insertion"]["random"][:, -1], p0, atol=1e-5)
    assert disagreements(list(rows.values())) == []
    fake = [
        {"metric": "deletion", "method": "m", "vs random": "better"},
        {"metric": "insertion", "method": "m", "vs random": "not distinguishable"},
    ]
    expected = (
        "m: against random order deletion says 'better', insertion says 'not distinguishable'"
    )
    assert disagreements(fake) == [expected]


def _small_cnn() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    out = keras.layers.Dense(2, activation="softmax", name="head_out")(x)
    return keras.Model(inputs, out, name="tiny_cnn")


@pytest.fixture(scope="module")
def trained_cnn():
    """Learns: a bright square top-left is class 0, bottom-right class 1."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    n = 256
    # textured background: a random net's maps follow the texture, a trained one's the square
    images = rng.integers(0, 130, size=(n, SIZE, SIZE, 3)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    for i, y in enumerate(labels):
        r, c = rng.integers(0, 4, 2) + (0 if y == 0 else SIZE // 2)
        images[i, r : r + 4, c : c + 4] += 125
    model = _small_cnn()
    model.compile(
        keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(images, labels, epochs=15, batch_size=32, verbose=0)
    accuracy = float((model.predict(images, verbose=0).argmax(1) == labels).mean())
    assert accuracy > 0.9, accuracy
    return model, images[:32], labels[:32]


def _sobel(model, images, class_ids):
    """An 'explanation' that ignores the model: the edge magnitude of the image."""
    grey = np.asarray(images, np.float64).mean(axis=-1)
    gx = np.zeros_like(grey)
    gy = np.zeros_like(grey)
    gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
    gy[:, 1:-1] = grey[:, 2:] - grey[:, :-2]
    return np.hypot(gx, gy)


def test_the_sanity_check_flags_an_edge_detector_and_passes_gradcam(trained_cnn):
    model, images, labels = trained_cnn
    before = [np.array(w) for w in model.get_weights()]

    def both(m, x, y):
        return {"Sobel": _sobel(m, x, y), **gradcam_maps()(m, x, y)}

    result = randomisation_check(model, images, labels, both, n_backbone_steps=2)
    assert result["images"] == 32 and len(result["steps"]) == 3 and result["steps"][0] == "head"
    assert result["median_rho"]["Sobel"] == pytest.approx([1.0, 1.0, 1.0])
    print(result["median_rho"])
    assert result["fails"]["Sobel"] and not result["fails"]["Grad-CAM"], result["median_rho"]
    assert (
        result["median_rho"]["Grad-CAM"][-1] < 0.5 and len(result["median_rho"]["Grad-CAM++"]) == 3
    )
    for a, b in zip(before, model.get_weights()):  # weights restored
        np.testing.assert_array_equal(a, b)


def test_readable_layer_picks_the_deepest_layer_with_enough_cells(trained_cnn):
    model = trained_cnn[0]
    assert readable_layer(model, min_cells=7) == ("conv3", (8, 8))
    assert readable_layer(model, min_cells=9) == ("conv2", (16, 16))  # deepest with >= 9x9 cells
    assert readable_layer(model, min_cells=99)[0] == "conv3"  # none has enough: the default layer
    # c2 sits inside a residual block (c1 also reaches the output through the pool): not a cut point
    i = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(i)
    y = keras.layers.Conv2D(4, 3, padding="same", name="c2")(x)
    z = keras.layers.Add(name="add")(
        [
            keras.layers.MaxPooling2D(name="pool")(x),
            keras.layers.Conv2D(4, 3, strides=2, padding="same", name="c3")(y),
        ]
    )
    out = keras.layers.Dense(2, name="head_out")(
        keras.layers.GlobalAveragePooling2D(name="head_pool")(z)
    )
    assert readable_layer(keras.Model(i, out), min_cells=9) == ("c1", (SIZE, SIZE))


def test_same_map_detector_and_spearman():
    constant = np.ones((10, SIZE, SIZE))
    assert map_similarity(constant)["same_map"] and map_similarity(constant)["median_rho"] == 1.0
    varied = np.random.default_rng(0).random((10, SIZE, SIZE))
    result = map_similarity(varied)
    assert not result["same_map"] and abs(result["median_rho"]) < 0.3 and result["images"] == 10
    a = np.array([[1.0, 2.0, 3.0, 4.0]])
    assert spearman_rows(a, a**3)[0] == pytest.approx(1.0) and spearman_rows(a, -a)[
        0
    ] == pytest.approx(-1.0)
    assert spearman_rows(np.array([[1.0, 1.0, 2.0]]), np.array([[1.0, 2.0, 3.0]]))[
        0
    ] == pytest.approx(0.8660254)


def test_region_stats_and_class_means_on_a_hand_made_case():
    maps = np.zeros((3, 10, 10))
    maps[0, 0:5, 0:5] = 1.0  # all heat in the top-left quarter ("eyes")
    maps[1, 5:10, 0:10] = 1.0  # all heat in the bottom half ("mouth" covers half of it)
    maps[1, 9, 9] = 2.0  # its hottest pixel: outside the mouth box
    maps[2] = 1.0
    regions = [{"eyes": [(0.0, 0.0, 0.5, 0.5)], "mouth": [(0.0, 0.5, 0.5, 1.0)]}] * 3
    rows = {
        r["class"]: r
        for r in region_stats(maps, regions, ["happy", "sad", "sad"], ["happy", "sad", "fear"])
    }
    assert set(rows) == {"happy", "sad"}  # no 'fear' image
    assert rows["happy"]["heat in eyes"] == 1.0 and rows["happy"]["heat in mouth"] == 0.0
    assert rows["happy"]["pointing hit rate"] == 1.0 and rows["happy"]["images"] == 1
    # sad: image 1 has 26/51 of its heat in the mouth box, image 2 (even heat) a quarter in each box
    assert rows["sad"]["heat in mouth"] == pytest.approx((25 / 51 + 0.25) / 2)
    assert rows["sad"]["pointing hit rate"] == pytest.approx(
        0.5
    )  # image 2's argmax is (0, 0): in the eyes
    means = class_mean_maps(
        maps, ["happy", "sad", "sad"], ["happy", "sad", "happy"], ["happy", "sad"]
    )
    assert (
        means["sad"][1] == 1 and np.array_equal(means["sad"][0], maps[1]) and means["happy"][1] == 1
    )
