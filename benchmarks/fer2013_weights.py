"""Does ImageNet initialisation help? MobileNetV2 with the offline ImageNet weights file vs
`weights=none` on FER2013 (5 classes, the challenge's own split), trained by the real trial code.
One JSON line.

    python3 benchmarks/fer2013_weights.py                       # sized for under 40 min on 2 CPU
    cores python3 benchmarks/fer2013_weights.py --max-train 200 --epochs 1 --max-eval 200   # smoke
    test

The first run prepares the 29k images once into --work (reused by later runs, e.g. after a smoke
test). The training-speed assumption behind the defaults (10k images x 10 epochs at 96 px): see
benchmarks/trial_speed.py for mobilenetv2 at 96 px on the same machine.

Split: Training_* train, PublicTest_* val, PrivateTest_* test (`prepare --predefined`). A stratified
subsample of the training split (--max-train) keeps the run inside the CPU budget; val and test are
used whole unless --max-eval caps them (smoke tests only: the reported intervals are then
meaningless). The ported MobileNetV2 file was made from torchvision weights, whose
BatchNormalization epsilon is 1e-5, so its run sets `bn_epsilon=1e-5` (with Keras's 1e-3 its
features are nearly constant across images). Both runs use the published head and two-stage schedule
otherwise (config defaults), the same seed and data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.shared_data import shared_missing, shared_path  # noqa: E402 - after the sys.path line

DEFAULT_DATA = shared_path("datasets", "fer2013-5class")
DEFAULT_WEIGHTS = shared_path("weights", "mobilenet_v2_1.0_torchvision_port_no_top.weights.h5")
PREDEFINED = "train=^Training_,val=^PublicTest_,test=^PrivateTest_"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="FER2013 class folders")
    p.add_argument("--weights-file", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "results" / "fer2013-weights",
        help="prepared data (reused by later runs) and the two trial folders",
    )
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument(
        "--max-train", type=int, default=10000, help="stratified training subsample; 0 = all"
    )
    p.add_argument(
        "--max-eval", type=int, default=0, help="cap val and test (smoke tests only); 0 = all"
    )
    p.add_argument("--epochs", type=int, default=None, help="set both stages' epochs")
    p.add_argument("--epochs-head", type=int, default=6)
    p.add_argument("--epochs-finetune", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", default="imagenet_file,none", help="which runs, comma-separated")
    return p.parse_args()


class SubsampledStudyData:
    """A `StudyData` whose splits are stratified subsamples (same class proportions), held in
    memory."""

    def __init__(self, data, caps: dict[str, int], seed: int):
        self.data, self.classes, self.class_weights = data, data.classes, data.class_weights
        self.source, self.dir = data.source, data.dir
        rng = np.random.default_rng(seed)
        self.index = {}
        for split, cap in caps.items():
            labels = data.labels(split)
            if cap and cap < len(labels):
                keep = [
                    rng.permutation(np.flatnonzero(labels == c))[
                        : max(1, round(cap * np.mean(labels == c)))
                    ]
                    for c in range(len(self.classes))
                ]
                self.index[split] = np.sort(np.concatenate(keep))

    def labels(self, split):
        labels = self.data.labels(split)
        return labels[self.index[split]] if split in self.index else labels

    def paths(self, split):
        paths = self.data.paths(split)
        return [paths[i] for i in self.index[split]] if split in self.index else paths

    def pixels(self, split, image_size):
        pixels = self.data.pixels(split, image_size)
        return np.asarray(pixels[self.index[split]]) if split in self.index else pixels


def main():
    args = parse_args()
    from fer.runtime.backend import configure_backend

    configure_backend(args.threads)
    from fer.core.config import make_config
    from fer.data import StudyData
    from fer.prepare import prepare_dataset
    from fer.runtime.machine import machine_info
    from fer.train.trial import run_trial

    if not args.weights_file.is_file():
        sys.exit(shared_missing(args.weights_file))
    if not args.data.is_dir():
        sys.exit(shared_missing(args.data))
    data_dir = args.work / "data"
    t0 = time.perf_counter()
    if not (data_dir / "manifest.csv").is_file():
        prepare_dataset(
            args.data,
            data_dir,
            image_size=args.image_size,
            predefined=PREDEFINED,
            seed=args.seed,
            log=lambda *a, **k: print(*a, file=sys.stderr),
        )  # stdout holds only the JSON line
    prepare_s = time.perf_counter() - t0
    full = StudyData(data_dir)
    data = SubsampledStudyData(
        full, {"train": args.max_train, "val": args.max_eval, "test": args.max_eval}, args.seed
    )
    counts = {s: len(data.labels(s)) for s in ("train", "val", "test")}
    print(f"images per split: {counts} (prepare/open {prepare_s:.0f} s)", file=sys.stderr)

    epochs_head = args.epochs if args.epochs is not None else args.epochs_head
    epochs_finetune = args.epochs if args.epochs is not None else args.epochs_finetune
    runs = {
        "imagenet_file": {"weights": str(args.weights_file), "bn_epsilon": 1e-5},
        "none": {"weights": "none"},
    }
    runs = {name: runs[name] for name in args.runs.split(",")}
    results = {}
    for name, overrides in runs.items():
        config = make_config(
            backbone="mobilenetv2",
            image_size=args.image_size,
            batch_size=args.batch_size,
            epochs_head=epochs_head,
            epochs_finetune=epochs_finetune,
            seed=args.seed,
            **overrides,
        )
        out = args.work / f"trial-{name}"
        t = time.perf_counter()
        summary = run_trial(
            config,
            data,
            out,
            evaluate_test=True,
            on_epoch=lambda r, n=name: print(
                f"[{n}] epoch {r['epoch']} {r['stage']}: val_loss {r['val_loss']:.4f} "
                f"val_acc {r['val_accuracy']:.3f} val_f1 {r['val_macro_f1']:.3f} "
                f"({r['epoch_s']:.0f} s)",
                file=sys.stderr,
            ),
        )
        test = json.loads((out / "test_metrics.json").read_text())
        results[name] = {
            "config": {k: config[k] for k in ("weights", "bn_epsilon")},
            "test_accuracy": test["accuracy"],
            "test_macro_f1": test["macro_f1"],
            "val_accuracy": summary["val_accuracy"],
            "val_macro_f1": summary["val_macro_f1"],
            "best_epoch": summary["best_epoch"],
            "best_stage": summary["best_stage"],
            "epochs_run": summary["epochs_run"],
            "seconds": round(time.perf_counter() - t, 1),
            "trial_folder": str(out),
        }
        print(
            f"[{name}] test accuracy {test['accuracy']['value']:.3f} {test['accuracy']['ci95']}, "
            f"macro-F1 {test['macro_f1']['value']:.3f} {test['macro_f1']['ci95']}",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "benchmark": "fer2013_weights",
                "backbone": "mobilenetv2",
                "image_size": args.image_size,
                "images": counts,
                "epochs_head": epochs_head,
                "epochs_finetune": epochs_finetune,
                "batch_size": args.batch_size,
                "seed": args.seed,
                "results": results,
                "machine": machine_info(),
            }
        )
    )


if __name__ == "__main__":
    main()
