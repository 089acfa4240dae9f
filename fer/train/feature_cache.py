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
  trial fits a tail model from them (fer/train/feature_models.py).

Both are computed once per *feature key* (kind, backbone, image size, weights, augmentation
strength, views, view seed, BN epsilon, dtype policy, backend, the prepared split, and for stage 2
the cut): `views` augmented passes over the train split and one clean pass over val, with the
model's own layers (augmentation in training mode, frozen layers in inference mode;
fer/train/feature_compute.py). Trials cycle through the views, one per image per epoch. Every trial
of a study must cut at the same place to share a stage-2 cache, so the cut is
`finetune_cache_units` backbone layers (or blocks) from the end; a study sets it to the largest
`unfreeze_layers` of its space, and a trial that unfreezes fewer keeps the rest of the tail frozen.

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
from fer.data.decode import file_sha256
from fer.train.feature_compute import FeatureSink, compute_features, effective_views
from fer.train.feature_models import (
    head_extractor,
    head_model,
    split_at_tail,
    tail_features_model,
    tail_layer_count,
)

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


@dataclasses.dataclass
class CachedFeatures:
    """The cached inputs of one key, memory-mapped float32: `train[i]` (views, N, ...), `val[i]`
    (N, ...) for each input tensor i of the model that trains on them."""

    key: str
    train: list[np.ndarray]
    val: list[np.ndarray]
    # True when this process computed them (False: loaded or waited for another process)
    computed: bool
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


def stage_features(
    model: keras.Model, stage: str, config: dict, study_data, dtype_policy: str
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
            source, _ = stage_features(model, "finetune", config, study_data, dtype_policy)
            extractor = tail_features_model(model, tail_layer_count(model, config))
        features = cached_features(extractor, spec, config, study_data, source=source)
        if source is not None:
            # the stage-2 cache was got for the head stage: its time is the head stage's
            features.seconds += source.seconds
            features.computed = features.computed or source.computed
        return features, head_model(model)
    prefix, tail, cut = split_at_tail(model, tail_layer_count(model, config))
    spec = feature_spec(config, study_data, dtype_policy, kind="finetune", cut=cut)
    return cached_features(prefix, spec, config, study_data), tail


def cached_features(
    extractor: keras.Model,
    spec: dict,
    config: dict,
    study_data,
    source: CachedFeatures | None = None,
) -> CachedFeatures:
    """The features of `spec`'s key: loaded, waited for, or computed here with `extractor` (once per
    study), from images or from `source` (see compute_features)."""
    t0 = time.perf_counter()
    key = feature_key(spec)
    folder = features_dir(study_data)
    folder.mkdir(parents=True, exist_ok=True)
    job = _CacheJob(extractor, spec, config, study_data, source, folder, key)
    computed = create_or_wait(
        job.marker, folder / f"{key}.lock", job.compute, stale_s=STALE_S, poll_s=POLL_S
    )
    n_inputs = len(extractor.outputs)
    return CachedFeatures(
        key,
        [np.load(job.path("train", i), mmap_mode="r") for i in range(n_inputs)],
        [np.load(job.path("val", i), mmap_mode="r") for i in range(n_inputs)],
        computed,
        time.perf_counter() - t0,
    )


@dataclasses.dataclass(frozen=True)
class _CacheJob:
    """Computing one key's files, run by whichever process takes the key's lock."""

    extractor: keras.Model
    spec: dict
    config: dict
    study_data: object
    source: CachedFeatures | None
    folder: Path
    key: str

    @property
    def marker(self) -> Path:
        """`<key>.json`, written last: the files are complete once it exists."""
        return self.folder / f"{self.key}.json"

    def path(self, split: str, i: int) -> Path:
        return self.folder / f"{self.key}.{split}.{i}.npy"

    def compute(self, beat: Callable[[], None]) -> None:
        """Check there is room, write the arrays, then the marker."""
        start = time.perf_counter()
        _check_room(self.extractor, self.config, self.study_data, self.folder, self.spec["kind"])
        train, val = self._write_arrays(beat)
        info = {
            "key": self.key,
            "spec": self.spec,
            "train_shapes": [list(a.shape) for a in train],
            "val_shapes": [list(a.shape) for a in val],
            "compute_s": round(time.perf_counter() - start, 2),
            "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(self.marker, info)
        log.info(
            "computed %s features %s in %.1f s", self.spec["kind"], self.key, info["compute_s"]
        )

    def _write_arrays(self, beat: Callable[[], None]) -> tuple[list, list]:
        """Compute into memory-mapped partial files, renamed into place when all are complete (a
        failure leaves none)."""
        partials = {}

        def allocate(split: str, i: int, shape: tuple) -> np.ndarray:
            partials[(split, i)] = partial_path(self.path(split, i))
            return np.lib.format.open_memmap(
                partials[(split, i)], mode="w+", dtype=np.float32, shape=shape
            )

        source = None if self.source is None else (self.source.train, self.source.val)
        sink = FeatureSink(allocate, beat, label=f"{self.spec['kind']} feature")
        try:
            train, val = compute_features(
                self.extractor, self.config, self.study_data, source=source, sink=sink
            )
            for array in train + val:
                array.flush()
            for (split, i), partial in partials.items():
                os.replace(partial, self.path(split, i))
        finally:
            for partial in partials.values():
                partial.unlink(missing_ok=True)
        return train, val


def _check_room(extractor: keras.Model, config: dict, study_data, folder: Path, kind: str) -> None:
    """Refuse, before computing, a cache the study folder's disk cannot hold (stage-2 caches of
    early cuts at large sizes are big: views x images x activation size), with the options that
    shrink it."""
    import shutil

    per_image = sum(int(np.prod(t.shape[1:])) for t in extractor.outputs) * 4
    n_train, n_val = len(study_data.labels("train")), len(study_data.labels("val"))
    views = effective_views(config)
    need = per_image * (views * n_train + n_val)
    free = shutil.disk_usage(folder).free
    log.info("%s feature cache: %.1f MiB in %s", kind, need / 2**20, folder)
    if need > 0.9 * free:
        raise UserError(
            f"the {kind} feature cache needs {need / 2**30:.1f} GiB ({views} views x {n_train} "
            f"train images x {per_image / 2**10:.0f} KiB) but {folder} has "
            f"{free / 2**30:.1f} GiB free; use fewer feature_views, a later cut (smaller "
            f"finetune_cache_units / unfreeze_layers), or the exact method ({kind}_features=exact)"
        )
