"""Export a trained model for deployment (SavedModel, TFLite, ONNX) and check that it gives the same
answers.

The exported graph takes what a camera gives -- raw RGB uint8 images (batch, S, S, 3) -- and returns
class probabilities: the model's `Preprocess` layer is inside it, and the augmentation layers
(`aug_*`) are traced in inference mode, where they are identity (fer/model/layers.py). Next to the
model, `export.json` names the classes, the input size and the check's results, so `fer-study
predict` can use the export like a `model.keras`. How each format is written: writers.py (int8
calibrates on train images of the study).

The check: the export is reloaded with its own runtime and run on up to 500 test images of the study
(an agreement check, not a tuning step, so the test split may be used); float exports must agree
with the Keras model to 1e-4 in probability, quantized ones on the top-1 class for 99% (float16) /
97% (int8) of images.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from fer.core.errors import UserError
from fer.deploy.exported import BATCH, EXPORT_JSON, FORMATS, ExportedModel
from fer.deploy.writers import inference_copy, write_onnx, write_saved_model, write_tflite

log = logging.getLogger(__name__)

QUANTIZATIONS = {"tflite": ("float16", "int8")}  # formats that have a quantization, and which
MODEL_FILES = {"saved_model": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}
FLOAT_TOLERANCE = 1e-4
TOP1_AGREEMENT = {"float16": 0.99, "int8": 0.97}
CHECK_IMAGES = 500
CALIBRATION_IMAGES = 200


def validate_request(fmt: str, quantize: str | None) -> None:
    """UserError for an unknown format, or a quantization the format does not have."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quantize is not None:
        allowed = QUANTIZATIONS.get(fmt, ())
        if not allowed:
            raise UserError(
                f"--quantize is not available for {fmt}; quantized exports: "
                + ", ".join(f"{f} ({'/'.join(q)})" for f, q in QUANTIZATIONS.items())
            )
        if quantize not in allowed:
            raise UserError(
                f"unknown quantization {quantize!r} for {fmt}; choose one of {', '.join(allowed)}"
            )


# ------------------------------------------------------------------------------------ one model
def export_model(
    model,
    classes: list[str],
    out_dir: str | Path,
    fmt: str,
    quantize: str | None = None,
    *,
    calibration: np.ndarray | None = None,
    source: str | None = None,
) -> Path:
    """Write the export of a Keras model (uint8 images in, probabilities out) and its export.json
    into `out_dir` (replaced); return the path of the model file or folder. `calibration`: uint8
    images for int8; `source`: where the model came from (recorded in export.json)."""
    validate_request(fmt, quantize)
    if len(classes) != int(model.output_shape[-1]):
        raise UserError(
            f"{len(classes)} class names for a model with {model.output_shape[-1]} outputs"
        )
    out_dir = _replaceable(Path(out_dir))
    model = inference_copy(model)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    target = partial / MODEL_FILES[fmt]
    try:
        _write_format(model, target, fmt, quantize, calibration)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # no half-written export left behind
        raise
    info = _export_info(model, classes, fmt, quantize, source)
    info["size_bytes"] = _size(target)
    (partial / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir / MODEL_FILES[fmt]


def _write_format(model, target: Path, fmt: str, quantize, calibration) -> None:
    if fmt == "saved_model":
        write_saved_model(model, target)
    elif fmt == "onnx":
        write_onnx(model, target)
    else:  # TFLite converts a SavedModel, written next to it for the purpose
        saved = target.parent / "saved_model.tmp"
        write_saved_model(model, saved)
        write_tflite(saved, target, quantize, calibration)
        shutil.rmtree(saved)


def _export_info(model, classes: list[str], fmt: str, quantize, source) -> dict:
    """export.json without the file size: what the export takes and gives, and where it came
    from."""
    size = int(model.input_shape[1])
    return {
        "format": fmt,
        "quantize": quantize,
        "file": MODEL_FILES[fmt],
        "classes": list(classes),
        "input_size": size,
        "input": f"uint8 RGB images, shape (batch, {size}, {size}, 3), values 0-255",
        "output": f"class probabilities, shape (batch, {len(classes)}), in the order of `classes`",
        "backbone": model.name.removeprefix("fer_"),
        "source": source,
    }


def _replaceable(out_dir: Path) -> Path:
    """`out_dir` if it is new, empty or an earlier export (which is replaced); never someone else's
    folder."""
    if (
        out_dir.exists()
        and not (out_dir / EXPORT_JSON).is_file()
        and (out_dir.is_file() or any(out_dir.iterdir()))
    ):
        raise UserError(
            f"{out_dir} exists and is not an earlier export; choose another --out (nothing was "
            "changed)"
        )
    return out_dir


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ------------------------------------------------------------------------------------ the check
def agreement(reference: np.ndarray, probs: np.ndarray, quantize: str | None) -> dict:
    """Compare an export's probabilities with the Keras model's: max abs difference, top-1
    agreement, and whether the export passes (float: every probability within 1e-4; quantized: top-1
    agreement)."""
    reference, probs = np.asarray(reference, np.float64), np.asarray(probs, np.float64)
    if reference.shape != probs.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {probs.shape}")
    diff = float(np.abs(reference - probs).max()) if reference.size else 0.0
    top1 = float((reference.argmax(1) == probs.argmax(1)).mean()) if len(reference) else 1.0
    result = {"n": len(reference), "max_abs_diff": diff, "top1_agreement": top1}
    if quantize is None:
        result.update(
            criterion=f"max_abs_diff <= {FLOAT_TOLERANCE:g}", ok=bool(diff <= FLOAT_TOLERANCE)
        )
    else:
        need = TOP1_AGREEMENT[quantize]
        result.update(criterion=f"top1_agreement >= {need:g}", ok=bool(top1 >= need))
    return result


def study_data_for(model_dir: Path, data_dir: str | Path | None = None):
    """The StudyData a best-model or trial folder came from (results/<study>/{best,trials}/<x>/ ->
    data/)."""
    from fer.core.study_folder import find_study
    from fer.data import StudyData

    if data_dir is None:
        study = find_study(model_dir)
        if study is None:
            raise UserError(
                f"{model_dir} is not in a study folder; pass --data results/<study>/data"
            )
        data_dir = study.data_dir
    return StudyData(data_dir)


def _sample_index(total: int, n: int, seed: int = 0) -> np.ndarray:
    """`n` of `total` indices, drawn the same way every time (all where fewer), in order. Not the
    first `n`: the manifest lists images class by class, so the first 500 could all be one emotion.
    """
    if total <= n:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


# -------------------------------------------------------------------------------- a study's model
def export_best(
    model_path: str | Path,
    fmt: str,
    quantize: str | None = None,
    out: str | Path | None = None,
    data_dir: str | Path | None = None,
    measure: bool = True,
) -> dict:
    """Export a study's trained model (a `model.keras` or the folder holding it, e.g.
    results/<s>/best/<b>), check it on the study's test images and time its runtime; returns (and
    stores in export.json) the summary. `ok` is False when the export disagrees with the Keras model
    beyond the criterion."""
    validate_request(fmt, quantize)  # before any slow load
    path = _model_file(model_path)
    out_dir = _replaceable(
        Path(out)
        if out is not None
        else path.parent / "export" / (fmt + (f"-{quantize}" if quantize else ""))
    )
    data = study_data_for(path.parent, data_dir)
    from fer.model.build import load_trained_model

    model = load_trained_model(path)
    size = int(model.input_shape[1])
    if len(data.classes) != int(model.output_shape[-1]):
        raise UserError(
            f"the study data has {len(data.classes)} classes, the model {model.output_shape[-1]}; "
            "pass the study's own --data"
        )
    calibration = _calibration_images(data, size) if quantize == "int8" else None
    test = data.pixels("test", size)
    if not len(test):
        raise UserError("the study has no test images to check the export on")
    export_model(
        model, data.classes, out_dir, fmt, quantize, calibration=calibration, source=str(path)
    )
    check, exported = _check_export(model, out_dir, test, data.labels("test"), quantize)
    info = json.loads((out_dir / EXPORT_JSON).read_text())
    info["check"] = check
    if measure:
        from fer.deploy.latency import measure_predict

        info["latency"] = measure_predict(exported.predict_batch, size, info["size_bytes"], fmt)
    (out_dir / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "folder": str(out_dir), "ok": check["ok"]}


def _model_file(model_path: str | Path) -> Path:
    """The model.keras file given as itself or as the folder holding it."""
    path = Path(model_path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise UserError(
            f"no model found at {model_path} (expected a model.keras file or a folder holding one)"
        )
    return path


def _calibration_images(data, size: int) -> np.ndarray:
    """int8 calibrates on train images (val where train is empty), never on test."""
    train = data.pixels("train", size)
    source = train if len(train) else data.pixels("val", size)
    return np.asarray(source[_sample_index(len(source), CALIBRATION_IMAGES)])


def _check_export(
    model, out_dir: Path, test, labels: np.ndarray, quantize
) -> tuple[dict, ExportedModel]:
    """Run the export with its own runtime on up to CHECK_IMAGES test images and compare with the
    Keras model (`agreement`), with the accuracy of each on those images: what a disagreement
    costs. Returns the check and the opened export."""
    from fer.data.batches import predict_probs

    index = _sample_index(len(test), CHECK_IMAGES)
    images = np.asarray(test[index])
    reference = predict_probs(model, images, BATCH)
    exported = ExportedModel(out_dir / EXPORT_JSON)
    probs = exported.predict(images)
    check = agreement(reference, probs, quantize)
    check["images"] = "test split" + (
        f", {len(index)} of {len(test)} drawn with seed 0" if len(test) > len(index) else ""
    )
    check["accuracy_keras"] = float((reference.argmax(1) == labels[index]).mean())
    check["accuracy_export"] = float((probs.argmax(1) == labels[index]).mean())
    return check, exported
