"""The input pipeline of training and prediction: fixed-shape batches from memory-mapped arrays.

`PixelBatches` serves uint8 images from the study's pixel cache (the exact path) or, as
`FeatureViews`, the cached frozen-part activations of `fer.train.feature_cache` (one augmented view
per image per epoch). `predict_probs` runs a model over such batches. Kept apart from
`fer.train.trial` (which drives the stages) and `fer.train.feature_cache` (which computes the
caches) so both can use it without importing each other.
"""

from __future__ import annotations

import math

import keras
import numpy as np


class PixelBatches(keras.utils.PyDataset):
    """Batches from a (memory-mapped) uint8 pixel array: (images, one-hot labels, class weights).

    With `label_smoothing` the one-hot targets come already smoothed (`smooth_targets`), so the
    smoothing is data, not a constant compiled into the train step
    (docs/pitfalls.md#baked-constants).

    `pixels` may also be a tuple of arrays of equal length (a model with several inputs: the cached
    activations of fer.train.feature_cache); each batch then holds a tuple of arrays in their place.

    Every batch has the same shape, because a new shape means a new trace/compile of the train or
    predict step (slow for a large backbone): for training the incomplete last
    batch is dropped (the order is reshuffled every epoch, so a different few images sit out each
    time); for prediction (no labels) the last batch is padded by repeating its last image, and the
    caller trims. The shuffle is seeded, so a run is repeatable; indices are sorted inside a batch
    for locality.
    """

    def __init__(
        self,
        pixels: np.ndarray,
        batch_size: int,
        labels: np.ndarray | None = None,
        num_classes: int = 0,
        class_weights: dict[int, float] | None = None,
        shuffle_seed: int | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.pixels, self.labels, self.num_classes = pixels, labels, num_classes
        self.label_smoothing = float(label_smoothing)
        self.batch_size = min(batch_size, _length(pixels))
        self.sample_weights = None
        if labels is not None and class_weights:
            table = np.array(
                [class_weights.get(i, 1.0) for i in range(num_classes)], dtype=np.float32
            )
            self.sample_weights = table[labels]
        self.rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
        self.order = np.arange(_length(pixels))
        if self.rng is not None:
            self.rng.shuffle(self.order)

    @property
    def num_batches(self) -> int:
        if self.labels is not None:  # training: drop the incomplete last batch
            return _length(self.pixels) // self.batch_size
        return math.ceil(_length(self.pixels) / self.batch_size)

    @property
    def images_per_epoch(self) -> int:
        return min(_length(self.pixels), self.num_batches * self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int):
        idx = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        if self.labels is None:
            pad = self.batch_size - len(idx)
            return (_take(self.pixels, np.concatenate([idx, np.repeat(idx[-1:], pad)])),)
        images = _take(self.pixels, idx)
        onehot = smooth_targets(
            np.eye(self.num_classes, dtype=np.float32)[self.labels[idx]], self.label_smoothing
        )
        if self.sample_weights is None:
            return images, onehot
        return images, onehot, self.sample_weights[idx]

    def on_epoch_end(self) -> None:
        if self.rng is not None:
            self.rng.shuffle(self.order)


def smooth_targets(onehot: np.ndarray, label_smoothing: float) -> np.ndarray:
    """Label-smoothed float32 targets, the same numbers Keras's
    `CategoricalCrossentropy(label_smoothing=s)` computes inside the step: y * float32(1 - s) +
    float32(s) / float32(K) (1 - s rounded from double, as from a Python float), each operation
    rounded to float32. s = 0 leaves the targets as they are."""
    if not label_smoothing:
        return onehot
    onehot = onehot.astype(np.float32, copy=False)
    k = np.float32(onehot.shape[-1])
    return onehot * np.float32(1.0 - label_smoothing) + np.float32(label_smoothing) / k


def _length(pixels) -> int:
    return len(pixels[0]) if isinstance(pixels, tuple) else len(pixels)


def _take(pixels, idx: np.ndarray):
    if isinstance(pixels, tuple):
        return tuple(np.asarray(a[idx]) for a in pixels)
    return np.asarray(pixels[idx])


def predict_probs(
    model: keras.Model, pixels, batch_size: int, tta_flip: bool = False
) -> np.ndarray:
    """Softmax probabilities for uint8 images (or a tuple of a model's input arrays), in order
    (inference mode: no augmentation, no dropout).

    `tta_flip` (the trial setting of the same name): each image's probabilities are the mean of
    the image's and its left-right mirror's, both in the same batch shape, so the same compiled
    predict step serves both. Images only: a cached feature array has no left and right.
    """
    n = _length(pixels)
    if n == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    if tta_flip and (isinstance(pixels, tuple) or np.ndim(pixels) != 4):
        raise ValueError("tta_flip mirrors images (N, H, W, C); these inputs are not images")
    # batch by batch, not model.predict: under TensorFlow every predict call builds a tf.data
    # pipeline over these batches and tears it down, which waits for its prefetch thread (time a
    # core sits idle; docs/benchmarks.md); the same compiled predict step
    batches = PixelBatches(pixels, batch_size)
    probs = np.concatenate(
        [_predict_batch(model, batches[i][0], tta_flip) for i in range(len(batches))]
    )
    return np.asarray(probs[:n], dtype=np.float32)  # drop the padding of the last batch


def _predict_batch(model: keras.Model, images, tta_flip: bool) -> np.ndarray:
    probs = np.asarray(model.predict_on_batch(images), dtype=np.float32)
    if tta_flip:
        mirrored = np.ascontiguousarray(images[:, :, ::-1])  # width is axis 2 (channels last)
        probs = (probs + np.asarray(model.predict_on_batch(mirrored), dtype=np.float32)) / 2
    return probs


class FeatureViews(PixelBatches):
    """Training batches from cached features: one view per image per epoch, cycling through the
    views.

    Same shuffling, one-hot labels and class weights as the pixel batches of the exact path."""

    def __init__(
        self,
        views: list[np.ndarray],
        batch_size: int,
        labels: np.ndarray,
        num_classes: int,
        class_weights: dict[int, float] | None,
        shuffle_seed: int | None,
        label_smoothing: float = 0.0,
    ):
        super().__init__(
            one_view(views, 0),
            batch_size,
            labels,
            num_classes,
            class_weights,
            shuffle_seed,
            label_smoothing,
        )
        self.views, self.view = views, 0

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        self.view = (self.view + 1) % len(self.views[0])
        self.pixels = one_view(self.views, self.view)


def model_input(arrays: list[np.ndarray]):
    """What a model with these inputs takes: the array itself for one input, else a tuple
    (PixelBatches takes both)."""
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def one_view(views: list[np.ndarray], view: int):
    """One view of every input."""
    return model_input([v[view] for v in views])
