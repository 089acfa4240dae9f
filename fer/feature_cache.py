"""Head-stage feature cache (`head_features: cached`): a frozen backbone's features, computed once per study.

Why: in stage 1 the backbone is frozen, so what the head sees for an augmented image -- GlobalAveragePooling of
the backbone's output -- does not depend on the trial's head hyperparameters (dense units, dropout, learning
rate). Recomputing it every epoch of every trial is most of a study's head-stage cost. Here it is computed
once per *feature key* (backbone, image size, weights, augmentation strength, number of views, view seed,
BN epsilon, dtype policy, backend, and the prepared split): `views` augmented passes over the train split
and one clean pass over val, with the model's own layers (augmentation in training mode, backbone in
inference mode). Each trial then trains a head-only model built from the SAME head layer objects on them,
one view per image per epoch, cycling through the views; stage 2 fine-tunes the full model as usual.

This is an approximation of the published method, hence opt-in: the head sees `views` fixed augmentations
instead of a fresh one every epoch, and the backbone's own dropout layers (EfficientNet's stochastic depth)
are off. `benchmarks/head_cache.py` measures its cost and accuracy against the exact path.

Concurrency: trials of one study may run at the same time on several nodes sharing the study folder; the
first to take the key's lock computes, the others wait (`fer.compute_once`).

Files: `<study>/data/features/<key>.train.npy` (float32, views x N x C), `<key>.val.npy` (N x C),
`<key>.json` (what the key stands for, and how long it took).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from fer.compute_once import POLL_S, STALE_S, atomic_save_npy, atomic_write_text, create_or_wait
from fer.data.decode import file_sha256
from fer.training import PixelBatches

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


@dataclasses.dataclass
class HeadFeatures:
    """Features of one key: `train` (views, N, C), `val` (N, C); both memory-mapped float32."""

    key: str
    train: np.ndarray
    val: np.ndarray
    computed: bool  # True when this process computed them (False: loaded or waited for another process)
    seconds: float  # time this process spent getting them (computing, waiting or loading)


def effective_views(config: dict) -> int:
    """Without augmentation every view would be the same image: one view is enough."""
    return int(config["feature_views"]) if config["augment"] > 0 else 1


def feature_spec(config: dict, study_data, dtype_policy: str) -> dict:
    """Everything the cached features depend on (and nothing a trial's head hyperparameters change)."""
    weights = config["weights"]
    if weights not in ("imagenet", "none"):
        weights = f"file:{file_sha256(Path(weights).expanduser())}"
    return {
        "backbone": config["backbone"], "image_size": config["image_size"], "weights": weights,
        "augment": config["augment"], "views": effective_views(config), "view_seed": config["seed"],
        "bn_epsilon": config["bn_epsilon"], "dtype_policy": dtype_policy, "backend": keras.backend.backend(),
        # a new `prepare` (other split, other files) makes new features
        "manifest_sha256": file_sha256(Path(study_data.dir) / "manifest.csv"),
    }


def feature_key(spec: dict) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec['backbone']}-{spec['image_size']}-{digest}"


def features_dir(study_data) -> Path:
    return Path(study_data.dir) / FEATURES_DIR


class _AugmentedFeatures(keras.Model):
    """Augmentation layers in training mode (random), then image -> pooled backbone features in inference mode."""

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


def feature_extractor(model: keras.Model) -> keras.Model:
    """The trial model's own layers from the (augmented) image to `head_pool`: preprocess -> backbone -> GAP."""
    return keras.Model(model.get_layer("preprocess").input, model.get_layer("head_pool").output,
                       name="head_features")


def compute_features(model: keras.Model, config: dict, study_data, beat: Callable[[], None] = lambda: None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train views x N x C, val N x C) float32, from the model's layers; `beat` is called after every batch.

    Fresh augmentation layers with the trial seed make the views (so computing them does not advance the
    RNG state of the model's own augmentation layers, which stage 2 still uses).
    """
    from fer.layers import augmentation_layers

    size, batch = config["image_size"], config["batch_size"]
    extractor = feature_extractor(model)
    views_model = _AugmentedFeatures(augmentation_layers(config["augment"], config["seed"]), extractor,
                                     name="augmented_features")
    callbacks = [_Heartbeat(beat)]
    train_pixels = study_data.pixels("train", size)
    views = np.stack([_predict(views_model, train_pixels, batch, callbacks) for _ in range(effective_views(config))])
    val = _predict(extractor, study_data.pixels("val", size), batch, callbacks)
    return views, val


def _predict(model: keras.Model, pixels: np.ndarray, batch: int, callbacks: list) -> np.ndarray:
    out = model.predict(PixelBatches(pixels, batch), verbose=0, callbacks=callbacks)
    return np.asarray(out[:len(pixels)], dtype=np.float32)  # PixelBatches may pad the last batch


def head_features(model: keras.Model, config: dict, study_data, dtype_policy: str, stale_s: float = STALE_S,
                  poll_s: float = POLL_S) -> HeadFeatures:
    """The cached features of this trial's key: loaded, waited for, or computed here (once per study)."""
    t0 = time.perf_counter()
    spec = feature_spec(config, study_data, dtype_policy)
    key = feature_key(spec)
    folder = features_dir(study_data)
    folder.mkdir(parents=True, exist_ok=True)
    train_path, val_path, marker = (folder / f"{key}.train.npy", folder / f"{key}.val.npy", folder / f"{key}.json")

    def compute(beat: Callable[[], None]) -> None:
        start = time.perf_counter()
        views, val = compute_features(model, config, study_data, beat)
        atomic_save_npy(train_path, views)
        atomic_save_npy(val_path, val)
        info = {"key": key, "spec": spec, "train_shape": list(views.shape), "val_shape": list(val.shape),
                "compute_s": round(time.perf_counter() - start, 2), "host": socket.gethostname(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(marker, json.dumps(info, indent=2) + "\n")
        log.info("computed head features %s in %.1f s", key, info["compute_s"])

    computed = create_or_wait(marker, folder / f"{key}.lock", compute, stale_s=stale_s, poll_s=poll_s)
    return HeadFeatures(key, np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r"), computed,
                        time.perf_counter() - t0)


class FeatureViews(PixelBatches):
    """Training batches from the cached features: one view per image per epoch, cycling through the views.

    Same shuffling, one-hot labels and class weights as the pixel batches of the exact path."""

    def __init__(self, views: np.ndarray, batch_size: int, labels: np.ndarray, num_classes: int,
                 class_weights: dict[int, float] | None, shuffle_seed: int | None):
        super().__init__(views[0], batch_size, labels, num_classes, class_weights, shuffle_seed)
        self.views, self.view = views, 0

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        self.view = (self.view + 1) % len(self.views)
        self.pixels = self.views[self.view]


def head_model(model: keras.Model) -> keras.Model:
    """A model from pooled features to class probabilities made of the SAME head layer objects as `model`,
    so training it trains the full model's head."""
    channels = model.get_layer("head_pool").output.shape[-1]
    inputs = keras.Input((channels,), name="features")
    x = model.get_layer("head_dense")(inputs)
    x = model.get_layer("head_dropout")(x)
    return keras.Model(inputs, model.get_layer("head_out")(x), name="head_only")
