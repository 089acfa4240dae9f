"""Deployment figures and export agreement on FER2013: one JSON line with the machine description.

    python3 benchmarks/export_check.py                    # about 35 min on a shared 2-core CPU
    python3 benchmarks/export_check.py --backbones mobilenetv2 --max-train 300 --skip-latency   #
    smoke

Two parts:
1. Latency: each backbone built at --latency-size (weights do not change the time, so
   `weights=none`), `fer.deploy.latency.measure_model` (Keras, one image: median/p90 of 50 calls;
   batch 64 images/s; CPU process milliseconds per image), and its float TFLite export: file size,
   TFLite latency, agreement with Keras on the first --check-images test images of FER2013.
2. Export agreement of a trained model: MobileNetV2 at --image-size with the offline ImageNet
   weights, head stage only on a stratified --max-train subsample (a few minutes: a confident model,
   not a good one), then `fer.deploy.export.export_best` in every format (what `fer-study export`
   runs): the self-check figures on the first 500 test images, the file size and the runtime's
   latency.

FER2013 is prepared once into --work (the challenge's own split:
Training_/PublicTest_/PrivateTest_). Wall-clock figures on a shared machine are noisy: the load
average is stored with each, and the CPU milliseconds per image are less affected by neighbours than
the wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "fer2013-5class"
DEFAULT_WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_tf_no_top.h5"
PREDEFINED = "train=^Training_,val=^PublicTest_,test=^PrivateTest_"
PUBLISHED = "efficientnetb1,resnet50,inceptionv3,mobilenetv2,densenet121"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--weights-file", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--work", type=Path, default=ROOT / "results" / "fer2013-export")
    p.add_argument("--backbones", default=PUBLISHED)
    p.add_argument("--latency-size", type=int, default=224)
    p.add_argument("--image-size", type=int, default=96, help="the trained model's input size")
    p.add_argument("--max-train", type=int, default=3000)
    p.add_argument("--max-val", type=int, default=1000)
    p.add_argument("--epochs-head", type=int, default=3)
    p.add_argument(
        "--check-images", type=int, default=100, help="agreement images of the latency part"
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-trained", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def latency_part(args, data, out: dict) -> None:
    from fer.core.config import make_config
    from fer.data.batches import predict_probs
    from fer.deploy.export import agreement, export_model
    from fer.deploy.exported import ExportedModel
    from fer.deploy.latency import measure_model, measure_predict
    from fer.model.build import build_model

    for name in args.backbones.split(","):
        t = time.perf_counter()
        model = build_model(
            make_config(backbone=name, image_size=args.latency_size, weights="none", augment=1.0),
            len(data.classes),
        )
        keras_figures = measure_model(model, args.threads)
        folder = args.work / "latency" / name
        export_model(model, data.classes, folder, "tflite")
        exported = ExportedModel(folder / "export.json")
        images = _resized(
            np.asarray(data.pixels("test", args.image_size)[: args.check_images]), args.latency_size
        )
        check = agreement(predict_probs(model, images, 64), exported.predict(images), None)
        tflite = measure_predict(
            exported.predict_batch, args.latency_size, exported.info["size_bytes"], "tflite"
        )
        out["latency"][name] = {
            "params": keras_figures["params"],
            "variables_mb": round(keras_figures["size_bytes"] / 1e6, 2),
            "keras_cpu": keras_figures["devices"]["cpu"],
            "tflite_mb": round(exported.info["size_bytes"] / 1e6, 2),
            "tflite_cpu": tflite["devices"]["cpu"],
            "tflite_check": check,
            "load_average": [keras_figures["load_average_before"], tflite["load_average_after"]],
            "seconds": round(time.perf_counter() - t, 1),
        }
        k, f = keras_figures["devices"]["cpu"], tflite["devices"]["cpu"]
        log(
            f"{name}: {keras_figures['params'] / 1e6:.1f} M params, "
            f"keras {k['latency_ms_median']:.1f} ms "
            f"(p90 {k['latency_ms_p90']:.1f}, cpu {k['cpu_ms_per_image']:.1f}), "
            f"{k['images_per_s']:.0f} img/s b64; "
            f"tflite {f['latency_ms_median']:.1f} ms, {exported.info['size_bytes'] / 1e6:.1f} MB, "
            f"max diff {check['max_abs_diff']:.1e}"
        )
        shutil.rmtree(folder, ignore_errors=True)
        _save(args, out)


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    """Test images enlarged to the latency size (no pixel cache of all 29k images at 224 px for 100
    of them)."""
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in pixels]
    )


def trained_part(args, data_dir: Path, out: dict) -> None:
    from fer2013_weights import SubsampledStudyData

    from fer.core.config import make_config
    from fer.data import StudyData
    from fer.deploy.export import export_best
    from fer.train.trial import run_trial

    best = args.work / "best" / "mobilenetv2"
    if not (best / "model.keras").is_file():
        data = SubsampledStudyData(
            StudyData(data_dir), {"train": args.max_train, "val": args.max_val}, 0
        )
        config = make_config(
            backbone="mobilenetv2",
            image_size=args.image_size,
            weights=str(args.weights_file),
            epochs_head=args.epochs_head,
            epochs_finetune=0,
            batch_size=32,
            seed=0,
        )
        run_trial(
            config,
            data,
            best,
            on_epoch=lambda r: log(
                f"epoch {r['epoch']}: val_acc {r['val_accuracy']:.3f} ({r['epoch_s']:.0f} s)"
            ),
        )
    out["trained"] = {
        "backbone": "mobilenetv2",
        "image_size": args.image_size,
        "max_train": args.max_train,
        "epochs_head": args.epochs_head,
        "val": json.loads((best / "summary.json").read_text()).get("val_accuracy"),
        "exports": {},
    }
    for fmt, quantize in (
        ("saved_model", None),
        ("tflite", None),
        ("tflite", "float16"),
        ("tflite", "int8"),
        ("onnx", None),
    ):
        key = fmt + (f"-{quantize}" if quantize else "")
        t = time.perf_counter()
        result = export_best(best, fmt, quantize)
        cpu = result["latency"]["devices"]["cpu"]
        out["trained"]["exports"][key] = {
            "check": result["check"],
            "size_mb": round(result["size_bytes"] / 1e6, 2),
            "cpu": cpu,
            "seconds": round(time.perf_counter() - t, 1),
        }
        log(
            f"{key}: {result['check']}, {result['size_bytes'] / 1e6:.2f} MB, "
            f"{cpu['latency_ms_median']:.2f} ms"
        )
        _save(args, out)


def _save(args, out: dict) -> None:
    (args.work / "export_check.json").write_text(json.dumps(out, indent=2) + "\n")


def main():
    args = parse_args()
    from fer.runtime.backend import configure_backend

    configure_backend(args.threads)
    from fer.data import StudyData
    from fer.prepare import prepare_dataset
    from fer.runtime.machine import machine_info

    data_dir = args.work / "data"
    if not (data_dir / "manifest.csv").is_file():
        prepare_dataset(
            args.data,
            data_dir,
            image_size=args.image_size,
            predefined=PREDEFINED,
            seed=0,
            log=lambda *a, **k: log(*a),
        )
    data = StudyData(data_dir)
    out = {
        "benchmark": "export_check",
        "latency_size": args.latency_size,
        "latency": {},
        "machine": machine_info(),
    }
    if not args.skip_trained:
        trained_part(args, data_dir, out)
    if not args.skip_latency:
        latency_part(args, data, out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
