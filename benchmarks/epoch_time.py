"""Epoch time of the from-scratch CNNs at 48 px on real FER2013 faces, one JSON line per backbone.

    python3 benchmarks/epoch_time.py [--backbones smallcnn,minixception,vggcnn] [--images 2000]
        [--epochs 3] [--threads 1]

Why: a search space's budget (search_spaces/fer2013-cpu.yaml) is trials x epochs x epoch time, and
the epoch time of a deeper network cannot be guessed from its parameter count. This takes a
stratified sample of `--images` `Training_` faces (and a quarter as many `PublicTest_` faces for
val, a tenth `PrivateTest_` for the unused test split) from `$FER_SHARED/datasets/fer2013-5class`,
prepares them with FER2013's own split at 48 px in a temporary folder, then runs a real trial per
backbone as the space trains it (one stage, the whole network, batch 64, augmentation 1.0, no
cache) with `--threads` threads. It prints per backbone the steady training images/s (each epoch's
first step excluded), the median seconds of a training epoch and of the val pass after it, and the
estimated seconds of one epoch on the whole reference split (18,575 train and 2,129 val images,
docs/reference.md). On a shared machine the wall-clock figures vary with the other jobs, so it
also prints the process's CPU seconds per steady epoch (`median_epoch_cpu_s`, with one thread what
an idle core would take) and scales them to the reference split (`reference_epoch_cpu_s`: by the
train images, which slightly overstates the val pass).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shared_data import shared_missing, shared_path  # noqa: E402

REFERENCE_TRAIN, REFERENCE_VAL = 18_575, 2_129  # kept by prepare in the reference study
PREFIXES = {"train": "Training_", "val": "PublicTest_", "test": "PrivateTest_"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", default="smallcnn,minixception,vggcnn")
    p.add_argument("--images", type=int, default=2000, help="Training_ images sampled")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (the first compiles)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    return p.parse_args()


def sample_folder(source: Path, out: Path, n_train: int) -> Path:
    """Class folders holding a stratified sample of each official split (copies: `prepare` does
    not follow symbolic links)."""
    import shutil

    rng = np.random.default_rng(0)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    wanted = {"train": n_train, "val": n_train // 4, "test": n_train // 10}
    for cls in classes:
        (out / cls).mkdir(parents=True)
    for split, total in wanted.items():
        files = {cls: sorted((source / cls).glob(f"{PREFIXES[split]}*")) for cls in classes}
        count = sum(len(f) for f in files.values())
        for cls, paths in files.items():
            take = max(1, round(total * len(paths) / count))
            for i in rng.choice(len(paths), size=min(take, len(paths)), replace=False):
                shutil.copy2(paths[i], out / cls / paths[i].name)
    return out


def main():
    args = parse_args()
    source = shared_path("datasets", "fer2013-5class")
    if not source.is_dir():
        sys.exit(shared_missing(source))
    from fer.runtime.backend import configure_backend

    configure_backend(args.threads)
    from fer.data import StudyData
    from fer.prepare import prepare_dataset
    from fer.train.trial import run_trial

    with tempfile.TemporaryDirectory(prefix="fer-epoch-time-") as tmp:
        tmp = Path(tmp)
        raw = sample_folder(source, tmp / "raw", args.images)
        predefined = ",".join(f"{s}=^{p}" for s, p in PREFIXES.items())
        prepare_dataset(
            raw, tmp / "data", image_size=48, predefined=predefined, log=lambda *a, **k: None
        )
        data = StudyData(tmp / "data")
        n_train, n_val = len(data.labels("train")), len(data.labels("val"))
        for backbone in args.backbones.split(","):
            out = tmp / backbone
            config = dict(
                backbone=backbone,
                image_size=48,
                weights="none",
                batch_size=args.batch_size,
                augment=1.0,
                epochs_head=0,
                epochs_finetune=args.epochs,
                patience=args.epochs + 1,
                unfreeze_layers=200,
                lr_finetune=1e-3,
            )
            cpu_at_epoch_end: list[float] = []
            summary = run_trial(
                config,
                data,
                out,
                on_epoch=lambda _, ends=cpu_at_epoch_end: ends.append(time.process_time()),
            )
            figures = _figures(backbone, summary, out, n_train, n_val, args)
            # CPU seconds of the process per steady epoch (training and the val pass): what an
            # idle core would take, however busy the shared machine is
            cpu_epoch_s = float(np.median(np.diff(cpu_at_epoch_end)))
            figures["median_epoch_cpu_s"] = round(cpu_epoch_s, 2)
            figures["reference_epoch_cpu_s"] = round(cpu_epoch_s * REFERENCE_TRAIN / n_train, 1)
            print(json.dumps(figures), flush=True)


def _figures(backbone: str, summary: dict, out: Path, n_train: int, n_val: int, args) -> dict:
    """The JSON line of one backbone: steady speed, median epoch and val seconds, the estimate."""
    import pandas as pd

    history = pd.read_csv(out / "history.csv")
    steady = history.iloc[1:] if len(history) > 1 else history  # the first epoch compiles
    train_ips = summary["stage_images_per_s"]["finetune"]
    per_epoch = n_train // args.batch_size * args.batch_size  # the last, short batch is dropped
    val_s = float(np.median(steady["epoch_s"] - per_epoch / steady["images_per_s"]))
    return {
        "benchmark": "epoch_time",
        "backbone": backbone,
        "image_size": 48,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "params": summary["params"],
        "train_images": n_train,
        "val_images": n_val,
        "epochs": int(len(history)),
        "train_images_per_s": round(train_ips, 1),
        "median_epoch_s": round(float(np.median(steady["epoch_s"])), 2),
        "median_val_pass_s": round(val_s, 2),
        "reference_epoch_s": round(REFERENCE_TRAIN / train_ips + val_s * REFERENCE_VAL / n_val, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


if __name__ == "__main__":
    main()
