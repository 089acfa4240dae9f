"""Does the trial's input path cost under 10%? Real trial epochs vs a bare train step, one JSON
line.

    python3 benchmarks/trial_speed.py --backbone mobilenetv2 --image-size 96 [--images 400] [--data
    DIR]

Runs a real trial (`run_trial`: pixel cache -> batches -> fit, both stages, 1 epoch each by default)
and measures its steady training images/s per stage (each stage's first step, i.e. graph
compilation, excluded). Then it times the same `fit` of the same model on in-memory arrays of the
same shape and dtype (no pixel cache, no PyDataset), per stage. ratio = trial / bare (target >=
0.9). Also reports the fixed start-up seconds: imports, model build, and the first (compiling) step
of each stage.

Without --data it generates demo data (fer.prepare.demo_data) and prepares it at the image size in a
temp folder. The weights do not change the speed; `none` is used because ImageNet cannot be
downloaded everywhere.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="mobilenetv2")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--images", type=int, default=400, help="demo images to generate (about 70%% train)"
    )
    p.add_argument("--epochs", type=int, default=1, help="epochs per stage")
    p.add_argument("--unfreeze-layers", type=int, default=30)
    p.add_argument(
        "--bare-steps", type=int, default=0, help="timed bare steps per stage [default: trial's]"
    )
    p.add_argument("--data", help="a prepared study/data folder to use instead of demo data")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


class _StepTimer:
    """Seconds between consecutive batch ends (the first batch of the fit excluded), like the
    trial's."""

    def __init__(self):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_end(timer, batch, logs=None):  # noqa: N805
                now = time.perf_counter()
                if batch > 0:
                    self.times.append(now - timer.last)
                timer.last = now

        self.times: list[float] = []
        self.callback = Timer()


def bare_images_per_s(model, config, stage, unfreeze, n_classes, steps, class_weights):
    """Images/s of the same compiled `fit` on in-memory arrays (one random batch repeated): the
    trial minus its input path. Returns (mean over steady steps, per-step median)."""
    import keras

    from fer.model.backbones import get_backbone
    from fer.model.build import set_stage

    size, batch = config["image_size"], config["batch_size"]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_classes, batch)
    x = np.repeat(
        rng.integers(0, 256, (1, batch, size, size, 3), dtype=np.uint8), steps + 1, axis=0
    )
    x = x.reshape(-1, size, size, 3)
    y = np.tile(np.eye(n_classes, dtype="float32")[labels], (steps + 1, 1))
    w = np.tile(np.array([class_weights.get(int(i), 1.0) for i in labels], "float32"), steps + 1)
    set_stage(model, stage, unfreeze, config["unfreeze_unit"], get_backbone(config["backbone"]))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    model.fit(
        x[: 2 * batch], y[: 2 * batch], sample_weight=w[: 2 * batch], batch_size=batch, verbose=0
    )  # compile
    timer = _StepTimer()
    model.fit(
        x,
        y,
        sample_weight=w,
        batch_size=batch,
        shuffle=False,
        verbose=0,
        callbacks=[timer.callback],
    )
    return batch * len(timer.times) / sum(timer.times), batch / float(np.median(timer.times))


def main():
    args = parse_args()
    import keras  # noqa: F401

    from fer.core.config import make_config
    from fer.data import StudyData
    from fer.model.build import build_model
    from fer.prepare import prepare_dataset
    from fer.runtime.backend import configure_backend
    from fer.runtime.machine import machine_info
    from fer.train.trial import run_trial

    applied = configure_backend(args.threads)
    import_s = time.perf_counter() - T0

    with tempfile.TemporaryDirectory(prefix="fer-trial-speed-") as tmp:
        tmp = Path(tmp)
        if args.data:
            data_dir = Path(args.data)
            data = StudyData(data_dir / "data" if (data_dir / "data").is_dir() else data_dir)
        else:
            from fer.prepare.demo_data import generate_demo_data

            generate_demo_data(tmp / "demo", per_class=max(2, args.images // 5), seed=0)
            prepare_dataset(
                tmp / "demo", tmp / "data", image_size=args.image_size, log=lambda *a, **k: None
            )
            data = StudyData(tmp / "data")
        config = make_config(
            backbone=args.backbone,
            image_size=args.image_size,
            weights="none",
            batch_size=args.batch_size,
            epochs_head=args.epochs,
            epochs_finetune=args.epochs,
            unfreeze_layers=args.unfreeze_layers,
            patience=max(2, args.epochs + 1),
        )
        summary = run_trial(config, data, tmp / "trial")
        n_train = len(data.labels("train"))

        # the bare step runs in the trial's precision (run_trial restores the global policy when it
        # returns)
        keras.config.set_dtype_policy(summary["dtype_policy"])
        model = build_model(config, len(data.classes))
        steps = args.bare_steps or max(3, n_train // args.batch_size)
        measured = {
            stage: bare_images_per_s(
                model, config, stage, unfreeze, len(data.classes), steps, data.class_weights
            )
            for stage, unfreeze in (("head", 0), ("finetune", args.unfreeze_layers))
        }

    # mean: all steady steps; median: per-step medians, robust to other processes' bursts on a
    # shared CPU
    bare = {stage: mean for stage, (mean, _) in measured.items()}
    bare_median = {stage: median for stage, (_, median) in measured.items()}
    trial = summary["stage_images_per_s"]
    trial_median = {stage: args.batch_size / s for stage, s in summary["median_step_s"].items()}
    ratio = {stage: trial[stage] / bare[stage] for stage in bare if trial.get(stage)}
    ratio_median = {stage: trial_median[stage] / bare_median[stage] for stage in ratio}
    # time-weighted over both stages: bare seconds for the trial's images / the trial's steady
    # seconds
    overall = sum(1 / bare[s] for s in ratio) / sum(1 / trial[s] for s in ratio)
    overall_median = sum(1 / bare_median[s] for s in ratio) / sum(
        1 / trial_median[s] for s in ratio
    )
    print(
        json.dumps(
            {
                "benchmark": "trial_speed",
                "backbone": args.backbone,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "train_images": n_train,
                "epochs_per_stage": args.epochs,
                "unfreeze_layers": args.unfreeze_layers,
                "trial_images_per_s": {s: round(v, 2) for s, v in trial.items()},
                "bare_images_per_s": {s: round(v, 2) for s, v in bare.items()},
                "ratio": {s: round(v, 3) for s, v in ratio.items()},
                "ratio_overall": round(overall, 3),
                "trial_images_per_s_median": {s: round(v, 2) for s, v in trial_median.items()},
                "bare_images_per_s_median": {s: round(v, 2) for s, v in bare_median.items()},
                "ratio_median": {s: round(v, 3) for s, v in ratio_median.items()},
                "ratio_overall_median": round(overall_median, 3),
                "load_average": [round(v, 2) for v in os.getloadavg()],
                "target_ratio": 0.9,
                "startup_s": round(
                    import_s + summary["build_s"] + sum(summary["first_step_s"].values()), 2
                ),
                "startup_parts_s": {
                    "imports": round(import_s, 2),
                    "build": round(summary["build_s"], 2),
                    **{f"first_step_{k}": round(v, 2) for k, v in summary["first_step_s"].items()},
                },
                "threads": applied["threads"],
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
