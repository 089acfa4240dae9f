"""Do later trials of one backbone reuse the first trial's compiled steps? Runs N trials of the same
backbone, image size, batch size and unfreeze depth, with DIFFERENT dropout, label smoothing and
learning rates, one after another in ONE warm process (as a warm study worker does), with the
study's JAX compilation cache (`<study>/compile_cache`, empty at the start). Prints ONE JSON line:
the machine (CPU model, cores, load average), the backend, and per trial each stage's compile
seconds = its first step minus its median step (summary.json `first_step_s` - `median_step_s`), plus
the later/first ratios. Target (issue 12, JAX on a CPU): a later trial compiles in <= 20% of the
first one's time.

    KERAS_BACKEND=jax python3 benchmarks/compile_reuse.py      # 3 trials, smallcnn at 48 px (~1-2
    min) python3 benchmarks/compile_reuse.py --trials 2 --backbone mobilenet025 --image-size 64

Needs no Ray (it runs on the GPU check machine, which has JAX but no TensorFlow): fer/ only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what differs between the trials: none of it may change the compiled program
# (docs/pitfalls.md#baked-constants)
VARIED = (
    {"dropout": 0.2, "label_smoothing": 0.0, "lr_head": 1e-3, "lr_finetune": 1e-4},
    {"dropout": 0.5, "label_smoothing": 0.1, "lr_head": 3e-3, "lr_finetune": 3e-5},
    {"dropout": 0.0, "label_smoothing": 0.2, "lr_head": 5e-4, "lr_finetune": 2e-4},
    {"dropout": 0.35, "label_smoothing": 0.05, "lr_head": 2e-3, "lr_finetune": 1e-5},
)


def compile_seconds(summary: dict) -> dict[str, float]:
    """Per stage: the first step's seconds beyond a steady step (tracing + compiling, or loading a
    cached program)."""
    first, median = summary.get("first_step_s") or {}, summary.get("median_step_s") or {}
    return {stage: round(first[stage] - median.get(stage, 0.0), 3) for stage in first}


def use_stock_layers() -> None:
    """Keras's Dropout(rate) and CategoricalCrossentropy(label_smoothing) in the train step, as
    before issue 12 (the same substitution as tests/test_compile_reuse.py makes)."""
    import keras

    import fer.data.batches
    import fer.model.build
    import fer.train.trial

    fer.model.build.HeadDropout = lambda rate, name: keras.layers.Dropout(rate, name=name)
    fer.data.batches.smooth_targets = lambda onehot, smoothing: onehot
    stock_loss, run_trial = keras.losses.CategoricalCrossentropy, fer.train.trial.run_trial

    def run_with_stock_loss(config, *args, **kwargs):
        class SmoothedLoss(stock_loss):
            def __init__(self, *a, **k):
                super().__init__(*a, **{**k, "label_smoothing": config["label_smoothing"]})

        keras.losses.CategoricalCrossentropy = SmoothedLoss
        try:
            return run_trial(config, *args, **kwargs)
        finally:
            keras.losses.CategoricalCrossentropy = stock_loss

    fer.train.trial.run_trial = run_with_stock_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per stage")
    parser.add_argument("--unfreeze-layers", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=24, help="demo images per class")
    parser.add_argument(
        "--data", help="a prepared study folder (with data/) to use instead of demo data"
    )
    parser.add_argument(
        "--stock-layers",
        action="store_true",
        help="for comparison: Keras's Dropout and label smoothing inside the loss "
        "(constants in the program, as before issue 12)",
    )
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="for comparison: build and compile the model anew each trial (before, a warm "
        "worker kept the model but compiled every stage again; by default it keeps both, as "
        "`run --reuse-workers` does)",
    )
    args = parser.parse_args()
    if args.stock_layers:
        use_stock_layers()

    from fer.data import StudyData
    from fer.prepare import prepare_dataset
    from fer.prepare.demo_data import generate_demo_data
    from fer.runtime.backend import backend_name, configure_backend
    from fer.runtime.machine import machine_info
    from fer.train.trial import run_trial
    from fer.train.warm import fresh_keras_state

    configure_backend(threads=int(os.environ.get("FER_THREADS", "0")) or None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = tmp / "study"
        if args.data:  # a copy of data/ only: the compile cache starts empty
            import shutil

            shutil.copytree(Path(args.data) / "data", study / "data")
        else:
            generate_demo_data(tmp / "demo", per_class=args.per_class, seed=0)
            prepare_dataset(
                tmp / "demo",
                study / "data",
                group_regex=r"^(S\d+)_",
                image_size=args.image_size,
                log=None,
            )
        data = StudyData(study / "data")
        trials = []
        for i in range(args.trials):
            if i:
                fresh_keras_state()  # what a warm study worker does between trials
            config = {
                "backbone": args.backbone,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "weights": "none",
                "dense_units": 16,
                "augment": 0.0,
                "epochs_head": args.epochs,
                "epochs_finetune": args.epochs,
                "patience": 10,
                "unfreeze_layers": args.unfreeze_layers,
                # a study's trials share its space's seed (and so a warm worker's kept model)
                "seed": 0,
                **VARIED[i % len(VARIED)],
            }
            started = time.perf_counter()
            summary = run_trial(config, data, tmp / f"trial{i}", reuse_model=not args.rebuild)
            compiled = compile_seconds(summary)
            trials.append(
                {
                    **{key: config[key] for key in VARIED[0]},
                    "compile_s": compiled,
                    "compile_total_s": round(sum(compiled.values()), 3),
                    "first_step_s": {k: round(v, 3) for k, v in summary["first_step_s"].items()},
                    "median_step_s": {k: round(v, 4) for k, v in summary["median_step_s"].items()},
                    "trial_s": round(time.perf_counter() - started, 2),
                    "compiled_stage_reused": summary["compiled_stage_reused"],
                    "val_loss": round(summary["val_loss"], 5),
                }
            )
        cache = study / "compile_cache"
        cache_files = len(list(cache.rglob("*"))) if cache.is_dir() else 0

    first = trials[0]["compile_s"]
    ratios = [
        {
            stage: round(t["compile_s"][stage] / first[stage], 3) if first.get(stage) else None
            for stage in first
        }
        for t in trials[1:]
    ]
    total_ratios = [
        round(t["compile_total_s"] / trials[0]["compile_total_s"], 3)
        if trials[0]["compile_total_s"]
        else None
        for t in trials[1:]
    ]
    machine = machine_info()
    print(
        json.dumps(
            {
                "benchmark": "compile_reuse",
                "backend": backend_name(),
                "stock_layers": args.stock_layers,
                "rebuild": args.rebuild,
                "backbone": args.backbone,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "unfreeze_layers": args.unfreeze_layers,
                "trials": trials,
                # per later trial and stage: its compile seconds / the first trial's
                "later_vs_first": ratios,
                "later_vs_first_total": total_ratios,
                "target_ratio": 0.2,
                "compile_cache_files": cache_files,
                "cpu": machine["cpu"],
                "cores": machine["cores"],
                "load_average": os.getloadavg(),
                "machine": machine,
            }
        )
    )


if __name__ == "__main__":
    main()
