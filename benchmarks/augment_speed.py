"""Cost of the training-time augmentation: Keras's four layers vs fer's one fused affine resampling.

Builds the trial model three times in one process -- augmentation as Keras's RandomFlip +
RandomRotation + RandomTranslation + RandomZoom (the usual way), as fer.model.layers.RandomAffine
(what trials use), and none -- and times compiled training steps of both stages on random uint8
images (median of per-epoch step times, the variants' epochs interleaved, the compiling first epoch
excluded). Prints one JSON line: seconds per step and the ratios.

    python3 benchmarks/augment_speed.py --backbone mobilenetv2 --image-size 96
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def keras_layers(seed: int) -> list:
    import keras

    return [
        keras.layers.RandomFlip("horizontal", seed=seed, name="aug_flip"),
        keras.layers.RandomRotation(0.05, fill_mode="nearest", seed=seed + 1, name="aug_rotate"),
        keras.layers.RandomTranslation(
            0.1, 0.1, fill_mode="nearest", seed=seed + 2, name="aug_shift"
        ),
        keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed + 3, name="aug_zoom"),
    ]


def epoch_seconds_per_step(model, images, labels, batch_size: int) -> float:
    t0 = time.perf_counter()
    model.fit(images, labels, batch_size=batch_size, epochs=1, verbose=0)
    return (time.perf_counter() - t0) / (len(images) // batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mobilenetv2")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12, help="steps per timed epoch")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per variant and stage")
    args = p.parse_args()

    import keras
    import numpy as np

    from fer.core.config import make_config
    from fer.model import layers as fer_layers
    from fer.model.backbones import get_backbone
    from fer.model.build import build_model, set_stage
    from fer.runtime.backend import configure_backend
    from fer.runtime.machine import machine_info

    configure_backend()
    rng = np.random.default_rng(0)
    n = args.steps * args.batch_size
    images = rng.integers(0, 256, (n, args.image_size, args.image_size, 3)).astype("uint8")
    labels = np.eye(5, dtype="float32")[rng.integers(0, 5, n)]
    config = make_config(backbone=args.backbone, image_size=args.image_size, weights="none")
    variants = {
        "keras_four_layers": lambda strength, seed: keras_layers(seed),
        "fused_affine": fer_layers.augmentation_layers,
        "none": lambda strength, seed: [],
    }
    result, models = {}, {}
    original = fer_layers.augmentation_layers
    import fer.model.build as fer_model

    for name, make_layers in variants.items():
        fer_model.augmentation_layers = make_layers  # build_model takes its augmentation from here
        try:
            models[name] = build_model(config, 5)
        finally:
            fer_model.augmentation_layers = original
    for stage, unfreeze, lr in (("head", 0, 1e-3), ("finetune", 30, 1e-4)):
        for model in models.values():
            set_stage(model, stage, unfreeze, "layers", get_backbone(args.backbone))
            model.compile(keras.optimizers.Adam(lr), "categorical_crossentropy")
            epoch_seconds_per_step(model, images, labels, args.batch_size)  # compiles
        # variants interleaved epoch by epoch, so a change in machine load hits all of them alike
        times = {name: [] for name in models}
        for _ in range(args.epochs):
            for name, model in models.items():
                times[name].append(epoch_seconds_per_step(model, images, labels, args.batch_size))
        for name in models:
            result[f"{name}_{stage}_step_s"] = round(statistics.median(times[name]), 4)
    for stage in ("head", "finetune"):
        keras_s, fused_s, none_s = (result[f"{v}_{stage}_step_s"] for v in variants)
        result[f"{stage}_fused_vs_keras_step_ratio"] = round(keras_s / fused_s, 3)
        result[f"{stage}_augment_share_keras"] = round((keras_s - none_s) / keras_s, 3)
        result[f"{stage}_augment_share_fused"] = round((fused_s - none_s) / fused_s, 3)
    print(
        json.dumps(
            {
                "benchmark": "augment_speed",
                "backbone": args.backbone,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                **result,
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
