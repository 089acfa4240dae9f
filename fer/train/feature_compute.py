"""Computing frozen features (fer/train/feature_cache.py stores them): `views` augmented passes of
an extractor over the train split and one clean pass over val.

The augmentation layers run in training mode (random) and the extractor in inference mode, so each
view is one fixed augmentation of every image and the frozen part's outputs do not depend on any
trial hyperparameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

from fer.data.batches import PixelBatches, model_input, one_view


def effective_views(config: dict) -> int:
    """Without augmentation every view would be the same image: one view is enough."""
    return int(config["feature_views"]) if config["augment"] > 0 else 1


def _in_memory(split: str, i: int, shape: tuple) -> np.ndarray:
    return np.empty(shape, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class FeatureSink:
    """Where a computation's results go. `allocate(split, i, shape)` makes each result array (the
    cache passes memory-mapped files, so only one view is held in memory); `beat` runs every batch
    (the cache's lock heartbeat); progress lines (rate, time left) name the cache by `label`."""

    allocate: Callable[[str, int, tuple], np.ndarray] = _in_memory
    beat: Callable[[], None] = lambda: None
    label: str = "feature"


def compute_features(
    extractor: keras.Model,
    config: dict,
    study_data,
    source: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    sink: FeatureSink = FeatureSink(),
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train arrays (views, N, ...), val arrays (N, ...)), one per output of `extractor`.

    From images (`source` None): fresh augmentation layers with the trial seed make the views (so
    computing them does not advance the RNG state of the model's own augmentation layers). From
    `source`, the (train, val) arrays of another cache whose arrays are `extractor`'s inputs: view
    by view (the head features from the stage-2 cache: the same augmented images, without running
    the frozen prefix again).
    """
    from fer.core.progress import Progress

    view_inputs, val_inputs = _pass_inputs(extractor, config, study_data, source)
    batch = config["batch_size"]
    shapes = [tuple(t.shape[1:]) for t in extractor.outputs]
    n_train, n_val = len(study_data.labels("train")), len(study_data.labels("val"))
    progress = Progress(f"{sink.label} cache", len(view_inputs) * n_train + n_val)

    def tick() -> None:
        sink.beat()
        progress.advance(batch)

    callbacks = [_Heartbeat(tick)]
    train = [
        sink.allocate("train", i, (len(view_inputs), n_train, *shape))
        for i, shape in enumerate(shapes)
    ]
    for view, (model, inputs) in enumerate(view_inputs):
        for i, values in enumerate(_predict(model, inputs, batch, callbacks)):
            train[i][view] = values
    val = [sink.allocate("val", i, (n_val, *shape)) for i, shape in enumerate(shapes)]
    for i, values in enumerate(_predict(extractor, val_inputs, batch, callbacks)):
        val[i][...] = values
    return train, val


def _pass_inputs(extractor: keras.Model, config: dict, study_data, source) -> tuple[list, object]:
    """([(model, train inputs)] one per view, val inputs): the augmented views of the train images
    (or the source cache's views) and the clean val images (or the source's val arrays)."""
    from fer.model.layers import augmentation_layers

    if source is not None:
        train, val = source
        views = [(extractor, one_view(train, view)) for view in range(len(train[0]))]
        return views, model_input(val)
    size = config["image_size"]
    augment = augmentation_layers(config["augment"], config["seed"])
    views_model = _Augmented(augment, extractor, name="views")
    train_pixels = study_data.pixels("train", size)
    return [(views_model, train_pixels)] * effective_views(config), study_data.pixels("val", size)


class _Augmented(keras.Model):
    """Augmentation layers in training mode (random), then `extractor` in inference mode."""

    def __init__(self, augment: list, extractor: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.augment, self.extractor = augment, extractor

    def call(self, x, training=False):
        for layer in self.augment:
            x = layer(x, training=True)
        return self.extractor(x, training=False)


class _Heartbeat(keras.callbacks.Callback):
    def __init__(self, beat: Callable[[], None]):
        super().__init__()
        self.beat = beat

    def on_predict_batch_end(self, batch, logs=None):
        self.beat()


def _predict(model: keras.Model, inputs, batch: int, callbacks: list) -> list[np.ndarray]:
    batches = PixelBatches(inputs, batch)
    out = model.predict(batches, verbose=0, callbacks=callbacks)
    out = out if isinstance(out, (list, tuple)) else [out]
    n = len(batches.order)
    return [np.asarray(a[:n], dtype=np.float32) for a in out]  # PixelBatches may pad the last batch
