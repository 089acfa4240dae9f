"""The fused augmentation layer (fer.model.layers.RandomAffine): the published draws, one
resampling, identity at inference, saved with the model."""

import numpy as np

from fer.model.layers import RandomAffine, augmentation_layers

SIZE = 64


def bar_image(col0=40, col1=44):
    """A vertical white bar right of the centre on black: where it lands shows the transform."""
    img = np.zeros((1, SIZE, SIZE, 3), "float32")
    img[:, 12:52, col0:col1] = 255.0
    return img


def draws(layer, img, n=16):
    return [np.asarray(layer(img, training=True))[0, :, :, 0] for _ in range(n)]


def test_identity_at_inference_and_published_strength():
    img = bar_image()
    np.testing.assert_array_equal(np.asarray(RandomAffine(seed=0)(img, training=False)), img)
    [layer] = augmentation_layers(1.0, seed=3)
    assert (layer.rotation, layer.shift, layer.zoom, layer.flip) == (0.05, 0.1, 0.1, True)
    assert layer.name.startswith("aug_") and augmentation_layers(0.0, seed=3) == []


def test_flip_alone_mirrors_about_half_the_images_exactly():
    img = bar_image()
    mirrored = img[0, :, ::-1, 0]
    outs = draws(RandomAffine(0.0, 0.0, 0.0, flip=True, seed=1), img, n=20)
    flipped = [np.allclose(o, mirrored, atol=1e-3) for o in outs]
    kept = [np.allclose(o, img[0, :, :, 0], atol=1e-3) for o in outs]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 4 <= sum(flipped) <= 16


def test_shift_zoom_and_rotation_stay_within_the_published_ranges():
    img = bar_image()
    # shifts: the bar's left edge moves by at most 10% of the width, and does move
    lefts = [
        np.where(o[32] > 127)[0].min()
        for o in draws(RandomAffine(0.0, 0.1, 0.0, flip=False, seed=2), img)
    ]
    assert max(abs(x - 40) for x in lefts) <= 0.1 * SIZE + 1 and len(set(lefts)) > 4
    # zoom about the centre: the bar's height (40 px) scales by 1/(1 +- 0.1)
    heights = [
        np.ptp(np.where(o[:, 42] > 127)[0]) + 1
        for o in draws(RandomAffine(0.0, 0.0, 0.1, flip=False, seed=3), img)
    ]
    assert all(40 / 1.1 - 1.5 <= h <= 40 / 0.9 + 1.5 for h in heights) and len(set(heights)) > 2
    # rotation by at most 18 degrees: the bar never lies down (its height stays >= 40 cos 18 - 4 px)
    for o in draws(RandomAffine(0.05, 0.0, 0.0, flip=False, seed=4), img):
        rows = np.where((o > 127).any(axis=1))[0]
        assert np.ptp(rows) + 1 >= 40 * np.cos(np.radians(18)) - 4


def test_one_resampling_keeps_images_sharper_than_three():
    """Keras's rotation + shift + zoom interpolate three times; the fused layer once (less blur)."""
    import keras

    img = np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE, 3)).astype("float32")
    small = dict(fill_mode="nearest")
    fused = np.asarray(RandomAffine(0.01, 0.02, 0.02, flip=False, seed=5)(img, training=True))
    chain = img
    for layer in (
        keras.layers.RandomRotation(0.01, seed=5, **small),
        keras.layers.RandomTranslation(0.02, 0.02, seed=6, **small),
        keras.layers.RandomZoom(0.02, seed=7, **small),
    ):
        chain = layer(chain, training=True)
    assert (
        np.asarray(chain).std() < fused.std()
    )  # interpolation averages neighbours: variance drops


def test_config_round_trip():
    layer = RandomAffine(0.1, 0.2, 0.3, flip=False, seed=9, name="aug_affine")
    clone = RandomAffine.from_config(layer.get_config())
    assert (clone.rotation, clone.shift, clone.zoom, clone.flip, clone.seed, clone.name) == (
        0.1,
        0.2,
        0.3,
        False,
        9,
        "aug_affine",
    )
