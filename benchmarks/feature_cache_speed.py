"""Frozen-feature caches: cost and accuracy of `head_features=cached` (and, with --epochs-finetune
N, `finetune_features=cached`) against the exact method.

    python3 benchmarks/feature_cache_speed.py [--per-class 100] [--image-size 48] [--trials 10]
    [--seeds 3] python3 benchmarks/feature_cache_speed.py ... --epochs-finetune 4     # both stages,
    both caches

A 10-trial study, one backbone, head hyperparameters (dense units, dropout, lr_head, and lr_finetune
when stage 2 runs) varying from trial to trial; the first trial is the published setting. By default
stage 1 only (epochs_finetune=0). The same configs run twice, exact (the frozen layers' forward pass
for every image every epoch) and cached (the study's first cached trial computes `feature_views`
augmented views per train image once; every trial trains on them). Reports

- seconds per trial of each stage: its epochs' seconds (training + validation + best-model saving)
  plus, for cached, the stage's one-off feature computation spread over the trials. Target: head
  stage cached >= 5x cheaper.
- final val accuracy of both, trial by trial, against the seed-to-seed spread of the exact method
  (the published setting with `--seeds` seeds). Target: |cached - exact| within that spread.

Data: a stratified FER2013 subsample (official Training/PublicTest split) from $FER_SHARED/datasets,
or demo data with --demo. Weights: a pretrained backbone is needed for meaningful accuracies (an
untrained one gives near-constant features); the default is MobileNet (alpha 0.25) from
$FER_SHARED/weights. All trials run in this one process, one after another, so imports are paid
once. Prints one JSON line.

What decides the speedup: the cached head stage removes the backbone's forward passes, leaving a
fixed cost per epoch (Keras's epoch set-up, validation, saving the best full model). So it shows
where the backbone forward pass is the work, e.g. (2-core Xeon, TensorFlow CPU)

    python3 benchmarks/feature_cache_speed.py --backbone mobilenetv2 --image-size 96 --epochs-head 6
    \
        --weights $FER_SHARED/weights/mobilenet_v2_1.0_torchvision_port_no_top.weights.h5

while with MobileNet 0.25 at 48 px (the quick default) the forward pass is cheap and the gain small
(about 2.5x).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from benchmarks.shared_data import shared_missing, shared_path  # noqa: E402 - after the sys.path line

DEFAULT_WEIGHTS = shared_path("weights", "mobilenet_2_5_224_tf_no_top.h5")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="mobilenet025")
    p.add_argument(
        "--weights", default=str(DEFAULT_WEIGHTS) if DEFAULT_WEIGHTS.is_file() else "none"
    )
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument(
        "--per-class", type=int, default=100, help="train images per class (val: a third of it)"
    )
    p.add_argument("--demo", action="store_true", help="use generated demo data instead of FER2013")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument(
        "--seeds", type=int, default=3, help="seeds of the exact published setting (spread)"
    )
    p.add_argument("--epochs-head", type=int, default=8)
    p.add_argument(
        "--epochs-finetune", type=int, default=0, help="stage 2 epochs (0: head stage only)"
    )
    p.add_argument("--unfreeze-layers", type=int, default=30)
    p.add_argument("--views", type=int, default=5, help="feature_views of the cached method")
    p.add_argument("--batch-size", type=int, default=32)
    return p.parse_args()


def trial_configs(n: int, seed: int = 0) -> list[dict]:
    """The published head setting first, then random head hyperparameters (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    configs = [{"dense_units": 256, "dropout": 0.53, "lr_head": 1e-3, "lr_finetune": 1e-4}]
    while len(configs) < n:
        configs.append(
            {
                "dense_units": int(rng.choice([64, 128, 256, 512])),
                "dropout": round(float(rng.uniform(0.2, 0.6)), 3),
                "lr_head": float(10 ** rng.uniform(-4, math.log10(3e-3))),
                "lr_finetune": float(10 ** rng.uniform(-5, math.log10(3e-4))),
            }
        )
    return configs


def prepare_data(args, tmp: Path):
    from fer.data import StudyData
    from fer.prepare import prepare_dataset

    quiet = {"log": lambda *a, **k: None}
    if args.demo:
        from fer.prepare.demo_data import GROUP_REGEX, generate_demo_data

        generate_demo_data(tmp / "src", per_class=args.per_class, seed=0)
        prepare_dataset(
            tmp / "src",
            tmp / "study" / "data",
            group_regex=GROUP_REGEX,
            image_size=args.image_size,
            **quiet,
        )
    else:
        from usual_way import FER2013, make_subset

        if not FER2013.is_dir():
            sys.exit(shared_missing(FER2013) + " (or pass --demo)")
        make_subset(
            FER2013, tmp, args.per_class, max(10, args.per_class // 3), seed=0, test_per_class=10
        )
        prepare_dataset(
            tmp / "flat",
            tmp / "study" / "data",
            image_size=args.image_size,
            predefined="train=^Training_,val=^PublicTest_,test=^PrivateTest_",
            **quiet,
        )
    return StudyData(tmp / "study" / "data")


def run_one(config: dict, data, out: Path) -> dict:
    """One trial: its seconds per stage, val accuracy, feature-cache info and CPU seconds."""
    import keras
    import pandas as pd

    from fer.train.trial import run_trial

    keras.backend.clear_session()
    cpu0 = time.process_time()
    summary = run_trial(config, data, out)
    history = pd.read_csv(out / "history.csv")
    caches = summary.get("feature_cache") or {}
    stats = {}
    for stage in ("head", "finetune"):
        cache = caches.get(stage, {})
        stats.update(
            {
                f"{stage}_s": float(history[history.stage == stage].epoch_s.sum())
                + cache.get("seconds", 0.0),
                f"{stage}_feature_s": cache.get("seconds", 0.0),
                f"{stage}_feature_computed": cache.get("computed", False),
                f"{stage}_epochs": int((history.stage == stage).sum()),
            }
        )
    return {
        **stats,
        "val_accuracy": summary["val_accuracy"],
        "val_loss": summary["val_loss"],
        "trial_cpu_s": time.process_time() - cpu0,
    }


def main():
    args = parse_args()
    from fer.core.config import make_config
    from fer.runtime.backend import configure_backend
    from fer.runtime.machine import machine_info

    configure_backend()
    base = dict(
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs_head=args.epochs_head,
        epochs_finetune=args.epochs_finetune,
        unfreeze_layers=args.unfreeze_layers,
        patience=3,
        feature_views=args.views,
        seed=0,
    )
    stages = ("head", "finetune") if args.epochs_finetune > 0 else ("head",)
    if "torchvision_port" in args.weights:
        base["bn_epsilon"] = 1e-5
    configs = trial_configs(args.trials)
    with tempfile.TemporaryDirectory(prefix="fer-head-cache-") as tmp:
        tmp = Path(tmp)
        data = prepare_data(args, tmp)
        runs = {"exact": [], "cached": []}
        for i, head in enumerate(configs):
            for method in ("exact", "cached"):
                config = make_config(
                    {
                        **base,
                        **head,
                        "head_features": method,
                        "finetune_features": method if "finetune" in stages else "exact",
                    }
                )
                runs[method].append(run_one(config, data, tmp / f"{method}{i}"))
                print(f"trial {i} {method}: {json.dumps(runs[method][-1])}", file=sys.stderr)
        spread = [runs["exact"][0]["val_accuracy"]]
        for seed in range(1, args.seeds):
            config = make_config({**base, **configs[0], "seed": seed})
            spread.append(run_one(config, data, tmp / f"seed{seed}")["val_accuracy"])
        n_train, n_val = len(data.labels("train")), len(data.labels("val"))

    per_stage = {}
    for (
        stage
    ) in stages:  # seconds per trial; cached includes the one-off, amortised over the trials
        exact_s = sum(r[f"{stage}_s"] for r in runs["exact"]) / len(configs)
        cached_s = sum(r[f"{stage}_s"] for r in runs["cached"]) / len(configs)
        per_stage.update(
            {
                f"exact_{stage}_s_per_trial": round(exact_s, 2),
                f"cached_{stage}_s_per_trial": round(cached_s, 2),
                f"{stage}_feature_compute_once_s": round(
                    sum(
                        r[f"{stage}_feature_s"]
                        for r in runs["cached"]
                        if r[f"{stage}_feature_computed"]
                    ),
                    2,
                ),
                f"{stage}_speedup": round(exact_s / cached_s, 2),
            }
        )
    diffs = [c["val_accuracy"] - e["val_accuracy"] for c, e in zip(runs["cached"], runs["exact"])]
    seed_range = max(spread) - min(spread)
    print(
        json.dumps(
            {
                "benchmark": "feature_cache",
                "backbone": args.backbone,
                "weights": Path(args.weights).name,
                "image_size": args.image_size,
                "data": "demo" if args.demo else "fer2013-subsample",
                "train_images": n_train,
                "val_images": n_val,
                "trials": len(configs),
                "epochs_head": args.epochs_head,
                "epochs_finetune": args.epochs_finetune,
                "unfreeze_layers": args.unfreeze_layers,
                "feature_views": args.views,
                **per_stage,
                "target_head_speedup": 5.0,
                "exact_trial_cpu_s": round(
                    statistics.mean(r["trial_cpu_s"] for r in runs["exact"]), 2
                ),
                "cached_trial_cpu_s": round(
                    statistics.mean(r["trial_cpu_s"] for r in runs["cached"]), 2
                ),
                "val_accuracy_exact": [round(r["val_accuracy"], 3) for r in runs["exact"]],
                "val_accuracy_cached": [round(r["val_accuracy"], 3) for r in runs["cached"]],
                "mean_accuracy_exact": round(
                    statistics.mean(r["val_accuracy"] for r in runs["exact"]), 4
                ),
                "mean_accuracy_cached": round(
                    statistics.mean(r["val_accuracy"] for r in runs["cached"]), 4
                ),
                "mean_abs_accuracy_diff": round(statistics.mean(abs(d) for d in diffs), 4),
                "max_abs_accuracy_diff": round(max(abs(d) for d in diffs), 4),
                "exact_seed_accuracies": [round(a, 3) for a in spread],
                "exact_seed_range": round(seed_range, 4),
                "exact_seed_std": round(statistics.stdev(spread), 4) if len(spread) > 1 else None,
                "within_seed_spread": abs(statistics.mean(diffs)) <= seed_range,
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
