"""Frozen-feature caches (`head_features: cached`, `finetune_features: cached`): computed once per
study.

Why: whatever part of the network is frozen computes, for a given augmented image, an output that
does not depend on the trial's hyperparameters. Recomputing it every epoch of every trial is most of
a study's cost.
- Stage 1 (head): the whole backbone is frozen, so the head only ever sees GlobalAveragePooling of
  the backbone's output. `head_features: cached` stores those pooled features; the trial trains a
  head-only model.
- Stage 2 (fine-tune): only the last `unfreeze_layers` backbone layers train; everything before them
  (the frozen *prefix*: augmentation, preprocessing, the early layers) still maps an augmented image
  to the same activations. `finetune_features: cached` stores the activations entering the trainable
  *tail* (one array per tensor crossing the cut: a residual block cut in the middle has two) and the
  trial fits a tail model from them. On a CPU at 96 px this cuts a MobileNetV2 fine-tune step about
  2.4x (30 layers unfrozen).

Both are computed once per *feature key* (kind, backbone, image size, weights, augmentation
strength, views, view seed, BN epsilon, dtype policy, backend, the prepared split, and for stage 2
the cut): `views` augmented passes over the train split and one clean pass over val, with the
model's own layers (augmentation in training mode, frozen layers in inference mode). Trials cycle
through the views, one per image per epoch. Every trial of a study must cut at the same place to
share a stage-2 cache, so the cut is `finetune_cache_units` backbone layers (or blocks) from the
end; a study sets it to the largest `unfreeze_layers` of its space, and a trial that unfreezes fewer
keeps the rest of the tail frozen.

This approximates the published method, hence opt-in: the network sees `views` fixed augmentations
instead of a fresh one every epoch, and dropout inside the frozen part (EfficientNet's stochastic
depth) is off. `benchmarks/feature_cache_speed.py` and `benchmarks/usual_way.py` measure cost and
accuracy against the exact path.

Concurrency: trials of one study may run at the same time on several nodes sharing the study folder;
the first to take the key's lock computes, the others wait (`fer.core.files`).

Files: `<study>/data/features/<key>.train.<i>.npy` (float32, views x N x ...), `<key>.val.<i>.npy`
(N x ...), one pair per input tensor i, and `<key>.json` (what the key stands for, how long it
took).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from fer.core.errors import UserError
from fer.core.files import POLL_S, STALE_S, create_or_wait, partial_path, write_json
from fer.data.batches import PixelBatches, model_input, one_view
from fer.data.decode import file_sha256
from fer.model.build import HEAD_PREFIX, backbone_layers

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


@dataclasses.dataclass
class CachedFeatures:
    """The cached inputs of one key, memory-mapped float32: `train[i]` (views, N, ...), `val[i]` (N,
    ...) for each input tensor i of the model that trains on them."""

    key: str
    train: list[np.ndarray]
    val: list[np.ndarray]
    computed: (
        bool  # True when this process computed them (False: loaded or waited for another process)
    )
    # time this process spent getting them (computing, waiting or loading); with both caches on, the
    # head stage's figures include getting the stage-2 cache its features are computed from
    seconds: float

    def info(self) -> dict:
        """What a trial's summary records about the cache it used."""
        return {
            "key": self.key,
            "views": int(self.train[0].shape[0]),
            "computed": self.computed,
            "seconds": round(self.seconds, 3),
            "bytes": int(sum(a.nbytes for a in self.train) + sum(a.nbytes for a in self.val)),
        }


def effective_views(config: dict) -> int:
    """Without augmentation every view would be the same image: one view is enough."""
    return int(config["feature_views"]) if config["augment"] > 0 else 1


def feature_spec(
    config: dict, study_data, dtype_policy: str, kind: str = "head", cut: str | None = None
) -> dict:
    """Everything the cached features depend on (and nothing the trainable part's hyperparameters
    change)."""
    weights = config["weights"]
    if weights not in ("imagenet", "none"):
        weights = f"file:{file_sha256(Path(weights).expanduser())}"
    spec = {
        "kind": kind,
        "backbone": config["backbone"],
        "image_size": config["image_size"],
        "weights": weights,
        "augment": config["augment"],
        "views": effective_views(config),
        "view_seed": config["seed"],
        "bn_epsilon": config["bn_epsilon"],
        "dtype_policy": dtype_policy,
        "backend": keras.backend.backend(),
        # a new `prepare` (other split, other files) makes new features
        "manifest_sha256": file_sha256(Path(study_data.dir) / "manifest.csv"),
    }
    if cut is not None:
        spec["cut"] = cut
    return spec


def feature_key(spec: dict) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{spec['kind']}-{spec['backbone']}-{spec['image_size']}-{digest}"


def features_dir(study_data) -> Path:
    return Path(study_data.dir) / FEATURES_DIR


# ---------------------------------------------------------------------------------------------- the
# models


def head_extractor(model: keras.Model) -> keras.Model:
    """The trial model's own layers from the (augmented) image to `head_pool`: preprocess ->
    backbone -> GAP."""
    return keras.Model(
        model.get_layer("preprocess").input,
        model.get_layer("head_pool").output,
        name="head_features",
    )


def head_model(model: keras.Model) -> keras.Model:
    """A model from pooled features to class probabilities made of the SAME head layer objects as
    `model`, so training it trains the full model's head."""
    channels = model.get_layer("head_pool").output.shape[-1]
    inputs = keras.Input((channels,), name="features")
    x = model.get_layer("head_dense")(inputs)
    x = model.get_layer("head_dropout")(x)
    return keras.Model(inputs, model.get_layer("head_out")(x), name="head_only")


def split_at_tail(model: keras.Model, tail_layers: int) -> tuple[keras.Model, keras.Model, str]:
    """Cut `model` before its last `tail_layers` backbone layers: (prefix, tail, cut name).

    `prefix` maps the (augmented) image to the tensors that cross the cut; `tail` maps those tensors
    to the class probabilities with the SAME layer objects as `model` (training it trains the full
    model).
    """
    crossing, cut = crossing_tensors(model, tail_layers)
    prefix = keras.Model(model.get_layer("preprocess").input, crossing, name="frozen_prefix")
    return prefix, keras.Model(crossing, model.output, name="trainable_tail"), cut


def crossing_tensors(model: keras.Model, tail_layers: int) -> tuple[list, str]:
    """The tensors entering the last `tail_layers` backbone layers (and the head) from before them,
    and the name of the first tail layer. Found by walking back from the output through the graph
    until a layer outside the tail and the head: more than one when the cut falls inside a residual
    block."""
    layers = backbone_layers(model)
    tail = layers[len(layers) - tail_layers :] if tail_layers > 0 else []
    inside = {id(layer) for layer in tail} | {
        id(layer) for layer in model.layers if layer.name.startswith(HEAD_PREFIX)
    }
    crossing, stack, seen = [], [model.output], set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        operation, node_index, _ = tensor._keras_history
        if id(operation) not in inside:
            crossing.append(tensor)
            continue
        stack.extend(reversed(operation._inbound_nodes[node_index].input_tensors))
    return crossing, (tail[0].name if tail else "head")


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


# ------------------------------------------------------------------------------------- computing,
# caching


def compute_features(
    extractor: keras.Model,
    config: dict,
    study_data,
    beat: Callable[[], None] = lambda: None,
    out: Callable[[str, int, tuple], np.ndarray] | None = None,
    source: CachedFeatures | None = None,
    label: str = "feature",
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train arrays (views, N, ...), val arrays (N, ...)), one per output of `extractor`.

    From images (`source` None): fresh augmentation layers with the trial seed make the views (so
    computing them does not advance the RNG state of the model's own augmentation layers). From
    `source`, another cache whose arrays are `extractor`'s inputs: view by view (the head features
    from the stage-2 cache: the same augmented images, without running the frozen prefix again).
    `out(split, i, shape)` allocates the result arrays (the cache passes memory-mapped files, so
    only one view is held in memory); `beat` runs every batch; progress lines (rate, time left) name
    the cache by `label`.
    """
    from fer.core.progress import Progress
    from fer.model.layers import augmentation_layers

    out = out or (lambda split, i, shape: np.empty(shape, dtype=np.float32))
    size, batch = config["image_size"], config["batch_size"]
    shapes = [tuple(t.shape[1:]) for t in extractor.outputs]
    if source is None:
        views_model = _Augmented(
            augmentation_layers(config["augment"], config["seed"]), extractor, name="views"
        )
        train_pixels = study_data.pixels("train", size)
        view_inputs = [(views_model, train_pixels)] * effective_views(config)
        val_inputs_ = study_data.pixels("val", size)
    else:
        view_inputs = [
            (extractor, one_view(source.train, view)) for view in range(len(source.train[0]))
        ]
        val_inputs_ = model_input(source.val)
    n_train, n_val = len(study_data.labels("train")), len(study_data.labels("val"))
    progress = Progress(f"{label} cache", len(view_inputs) * n_train + n_val)

    def tick() -> None:
        beat()
        progress.advance(batch)

    callbacks = [_Heartbeat(tick)]
    train = [out("train", i, (len(view_inputs), n_train, *shape)) for i, shape in enumerate(shapes)]
    for view, (model, inputs) in enumerate(view_inputs):
        for i, values in enumerate(_predict(model, inputs, batch, callbacks)):
            train[i][view] = values
    val = [out("val", i, (n_val, *shape)) for i, shape in enumerate(shapes)]
    for i, values in enumerate(_predict(extractor, val_inputs_, batch, callbacks)):
        val[i][...] = values
    return train, val


def _predict(model: keras.Model, inputs, batch: int, callbacks: list) -> list[np.ndarray]:
    batches = PixelBatches(inputs, batch)
    out = model.predict(batches, verbose=0, callbacks=callbacks)
    out = out if isinstance(out, (list, tuple)) else [out]
    n = len(batches.order)
    return [np.asarray(a[:n], dtype=np.float32) for a in out]  # PixelBatches may pad the last batch


def cached_features(
    extractor: keras.Model,
    spec: dict,
    config: dict,
    study_data,
    stale_s: float = STALE_S,
    poll_s: float = POLL_S,
    source: CachedFeatures | None = None,
) -> CachedFeatures:
    """The features of `spec`'s key: loaded, waited for, or computed here with `extractor` (once per
    study), from images or from `source` (see compute_features)."""
    t0 = time.perf_counter()
    key = feature_key(spec)
    folder = features_dir(study_data)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"{key}.json"
    n_inputs = len(extractor.outputs)

    def path(split: str, i: int) -> Path:
        return folder / f"{key}.{split}.{i}.npy"

    def compute(beat: Callable[[], None]) -> None:
        start = time.perf_counter()
        _check_room(extractor, config, study_data, folder, spec["kind"])
        partials = {}

        def allocate(split: str, i: int, shape: tuple) -> np.ndarray:
            partials[(split, i)] = partial_path(path(split, i))
            return np.lib.format.open_memmap(
                partials[(split, i)], mode="w+", dtype=np.float32, shape=shape
            )

        try:
            train, val = compute_features(
                extractor,
                config,
                study_data,
                beat,
                out=allocate,
                source=source,
                label=f"{spec['kind']} feature",
            )
            for array in train + val:
                array.flush()
            for (split, i), partial in partials.items():
                os.replace(partial, path(split, i))
        finally:
            for partial in partials.values():
                partial.unlink(missing_ok=True)
        info = {
            "key": key,
            "spec": spec,
            "train_shapes": [list(a.shape) for a in train],
            "val_shapes": [list(a.shape) for a in val],
            "compute_s": round(time.perf_counter() - start, 2),
            "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(marker, info)
        log.info("computed %s features %s in %.1f s", spec["kind"], key, info["compute_s"])

    computed = create_or_wait(
        marker, folder / f"{key}.lock", compute, stale_s=stale_s, poll_s=poll_s
    )
    return CachedFeatures(
        key,
        [np.load(path("train", i), mmap_mode="r") for i in range(n_inputs)],
        [np.load(path("val", i), mmap_mode="r") for i in range(n_inputs)],
        computed,
        time.perf_counter() - t0,
    )


def _check_room(extractor: keras.Model, config: dict, study_data, folder: Path, kind: str) -> None:
    """Refuse, before computing, a cache the study folder's disk cannot hold (stage-2 caches of
    early cuts at large sizes are big: views x images x activation size), with the options that
    shrink it."""
    import shutil

    per_image = sum(int(np.prod(t.shape[1:])) for t in extractor.outputs) * 4
    n_train, n_val = len(study_data.labels("train")), len(study_data.labels("val"))
    need = per_image * (effective_views(config) * n_train + n_val)
    free = shutil.disk_usage(folder).free
    log.info("%s feature cache: %.1f MiB in %s", kind, need / 2**20, folder)
    if need > 0.9 * free:
        raise UserError(
            f"the {kind} feature cache needs {need / 2**30:.1f} GiB ({effective_views(config)} views x {n_train} "
            f"train images x {per_image / 2**10:.0f} KiB) but {folder} has {free / 2**30:.1f} GiB free; use fewer "
            "feature_views, a later cut (smaller finetune_cache_units / unfreeze_layers), or the exact method "
            f"({kind}_features=exact)"
        )


def stage_features(
    model: keras.Model, stage: str, config: dict, study_data, dtype_policy: str, **kwargs
) -> tuple[CachedFeatures, keras.Model]:
    """A stage's cache and the model (of the same trainable layers as `model`) that trains on it.

    'head': pooled backbone features and the head-only model; 'finetune': the activations entering
    the tail (the last `finetune_cache_units`, or `unfreeze_layers`, backbone layers or blocks) and
    the tail model. With both caches on, the head features are computed from the stage-2 cache (the
    frozen tail run on the same augmented views): the prefix runs once for both, and the head key
    stays the same (the values are the same function of the same images).
    """
    if stage == "head":
        spec = feature_spec(config, study_data, dtype_policy, kind="head")
        extractor, source = head_extractor(model), None
        if config["finetune_features"] == "cached" and config["epochs_finetune"] > 0:
            source, _ = stage_features(
                model, "finetune", config, study_data, dtype_policy, **kwargs
            )
            crossing, _ = crossing_tensors(model, _tail_layers(model, config))
            extractor = keras.Model(
                crossing, model.get_layer("head_pool").output, name="tail_features"
            )
        features = cached_features(extractor, spec, config, study_data, source=source, **kwargs)
        if (
            source is not None
        ):  # the stage-2 cache was got for the head stage: its time is the head stage's
            features.seconds += source.seconds
            features.computed = features.computed or source.computed
        return features, head_model(model)
    prefix, tail, cut = split_at_tail(model, _tail_layers(model, config))
    spec = feature_spec(config, study_data, dtype_policy, kind="finetune", cut=cut)
    return cached_features(prefix, spec, config, study_data, **kwargs), tail


def _tail_layers(model: keras.Model, config: dict) -> int:
    """Backbone layers after the stage-2 cut: the last `finetune_cache_units` (or `unfreeze_layers`)
    units."""
    from fer.model.backbones import get_backbone
    from fer.model.build import last_backbone_layers

    units = config["finetune_cache_units"] or config["unfreeze_layers"]
    return len(
        last_backbone_layers(
            model, units, config["unfreeze_unit"], get_backbone(config["backbone"])
        )
    )
