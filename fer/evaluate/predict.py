"""Inference without Ray: a trained model applied to new images (behind `fer-study predict` and
`evaluate`).

Images are decoded exactly as `prepare` decodes them (`fer.data.decode`: content-sniffed, HEIC/HEIF
included, EXIF orientation applied, squashed to the model's input size), so a prediction here
matches what the model saw in training. Files that cannot be decoded are skipped, counted and named,
never silently.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fer.core import names
from fer.core.errors import UserError

log = logging.getLogger(__name__)

CLASSES_SOURCES = ("classes.json", names.metrics_file("val"), names.TEST_METRICS_FILE)


def load_model_and_classes(model_path: str | Path):
    """Load `model.keras` (or a trial folder holding one) and its class names.

    Loading is `fer.model.build.load_trained_model`; class names come from the folder's metrics
    files (`classes`), which every trial writes. Returns (model, classes, folder).
    """
    path = Path(model_path)
    if path.is_dir():
        path = path / names.MODEL_FILE
    if not path.is_file():
        raise UserError(
            f"no model found at {model_path} (expected a model.keras file or a trial folder)"
        )
    from fer.model.build import load_trained_model

    model = load_trained_model(path)
    folder = path.parent
    num_classes = int(model.output_shape[-1])
    classes = None
    for name in CLASSES_SOURCES:
        source = folder / name
        if source.is_file():
            data = json.loads(source.read_text())
            classes = data if isinstance(data, list) else data.get("classes")
            if classes:
                break
    if not classes or len(classes) != num_classes:
        log.warning("no class names next to %s; using class_0..class_%d", path, num_classes - 1)
        classes = [f"class_{i}" for i in range(num_classes)]
    return model, list(classes), folder


def _image_files(inputs: list[str | Path]) -> list[Path]:
    """Files named on the command line, and every file under folders named there (sorted)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            )
        else:
            raise UserError(f"no such file or folder: {item}")
    return files


def decode_images(
    files: list[Path], size: int
) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Decode files like `prepare` does; returns (uint8 pixels, decoded files, [(skipped file,
    reason)])."""
    pixels, kept, skipped = decode_images_at(files, [size])
    return pixels[size], kept, skipped


def decode_images_at(
    files: list[Path], sizes: list[int]
) -> tuple[dict[int, np.ndarray], list[Path], list[tuple[Path, str]]]:
    """`decode_images` at several input sizes (models of an ensemble): each file decoded once,
    then resized to every size; returns ({size: uint8 pixels}, decoded files, skipped)."""
    from fer.data.decode import Quarantine, decode_file, resize_square

    pixels: dict[int, list] = {size: [] for size in sizes}
    kept, skipped = [], []
    for path in files:
        try:
            rgb = decode_file(path).rgb
        except Quarantine as reason:
            skipped.append((path, str(reason)))
            continue
        for size in sizes:
            pixels[size].append(resize_square(rgb, size))
        kept.append(path)
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    arrays = {
        size: np.stack(rows) if rows else np.zeros((0, size, size, 3), np.uint8)
        for size, rows in pixels.items()
    }
    return arrays, kept, skipped


def _input_size(model) -> int:
    return int(model.input_shape[1])


def load_for_prediction(model_path: str | Path):
    """(predict(uint8 pixels, batch_size) -> probs, classes, input size, backbone, Keras model or
    None) for a model.keras / trial folder, or for a `fer-study export` (recognised by the
    export.json next to it)."""
    from fer.deploy.exported import ExportedModel, find_export

    export_json = find_export(model_path)
    if export_json is not None:
        exported = ExportedModel(export_json)
        return (
            exported.predict,
            exported.classes,
            exported.input_size,
            exported.info.get("backbone"),
            None,
        )
    model, classes, folder = load_model_and_classes(model_path)
    from fer.data.batches import predict_probs

    tta_flip = trained_with_tta_flip(folder)
    return (
        lambda pixels, batch_size: predict_probs(model, pixels, batch_size, tta_flip=tta_flip),
        classes,
        _input_size(model),
        model.name.removeprefix("fer_"),
        model,
    )


def trained_with_tta_flip(folder: Path) -> bool:
    """The trial's `tta_flip` from the config.json beside its model.keras (False without one), so
    `predict` and `evaluate` use the predictor the study validated and tested: with tta_flip 1 the
    mean of each image and its mirror (fer.data.batches.predict_probs). An export
    (fer.deploy) computes the single-image probabilities."""
    from fer.core.config import PARAMS, coerce

    path = folder / names.CONFIG_FILE
    if not path.is_file():
        return False
    # this key only: the model is already loaded, the trial's other settings do not matter here
    value = json.loads(path.read_text()).get("tta_flip", PARAMS["tta_flip"].default)
    return bool(coerce("tta_flip", value))


def predict_images(
    model_path: str | Path,
    inputs: list[str | Path],
    gradcam_dir: str | Path | None = None,
    batch_size: int = 32,
) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Predicted emotion and every class probability per image; optional Grad-CAM overlays.

    Returns (table with path, predicted, confidence, p_<class>; skipped files with reasons).
    """
    files = _image_files(inputs)  # bad paths fail before the (slow) Keras import and model load
    if not files:
        raise UserError("no files to predict in " + ", ".join(map(str, inputs)))
    predict, classes, size, _, model = load_for_prediction(model_path)
    if gradcam_dir is not None and model is None:
        raise UserError(
            "--gradcam needs the model.keras (an exported model has no gradients to explain)"
        )
    pixels, kept, skipped = decode_images(files, size)
    if not kept:
        raise UserError(
            f"none of the {len(files)} files could be decoded as an image "
            f"(first: {skipped[0][0]}: {skipped[0][1]})"
        )
    probs = predict(pixels, batch_size)
    table = pd.DataFrame(
        {
            "path": [str(p) for p in kept],
            "predicted": [classes[i] for i in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1),
        }
    )
    for i, name in enumerate(classes):
        table[f"p_{name}"] = probs[:, i]
    if gradcam_dir is not None:
        save_gradcam_overlays(model, pixels, kept, classes, Path(gradcam_dir))
    return table, skipped


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80] or "image"


def save_gradcam_overlays(
    model, pixels: np.ndarray, files: list[Path], classes: list[str], out_dir: Path
) -> list[Path]:
    """One PNG per image: the image, its Grad-CAM and its Grad-CAM++ for the predicted class, side
    by side."""
    from PIL import Image

    from fer.explain.gradcam import GradCam, overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    explanation = GradCam(model).explain(pixels)
    written = []
    scale = max(1, 224 // pixels.shape[1])  # small models: enlarge so the heatmap can be seen
    for i, path in enumerate(files):
        panels = [
            pixels[i],
            overlay(pixels[i], explanation.gradcam[i]),
            overlay(pixels[i], explanation.gradcam_pp[i]),
        ]
        strip = Image.fromarray(np.concatenate(panels, axis=1))
        if scale > 1:
            strip = strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST)
        target = out_dir / f"{i:04d}_{_safe_stem(path)}_{classes[explanation.class_ids[i]]}.png"
        target = target.with_name(_safe_stem(target) + ".png")
        strip.save(target)
        written.append(target)
    return written


def _class_folders(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise UserError(f"no such folder: {data_dir}")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"{data_dir} has no class folders (expected DATA/<class>/<image>)")
    return folders


def _labelled_files(
    data_dir: Path, folders: list[Path], classes: list[str]
) -> tuple[list[Path], list[int], list[str]]:
    """Files of the class folders that name a model class; returns also the other folders' names."""
    index = {name: i for i, name in enumerate(classes)}
    files, labels, unknown = [], [], []
    for folder in folders:
        if folder.name not in index:
            unknown.append(folder.name)
            continue
        for path in sorted(
            p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
        ):
            files.append(path)
            labels.append(index[folder.name])
    if not files:
        raise UserError(
            f"no class folder of {data_dir} matches the model's classes ({', '.join(classes)}); "
            f"found: {', '.join(f.name for f in folders)}"
        )
    for name in unknown:
        log.warning("skipped folder %s: not a class of the model", name)
    return files, labels, unknown


def _compile_filter(pattern: str | None, option: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{option} {pattern!r} is not a valid regular expression: {exc}") from None


def filter_files(
    files: list[Path], labels: list[int], include: str | None = None, exclude: str | None = None
) -> tuple[list[Path], list[int], int]:
    """Keep the files whose NAME matches `include` (re.search) and not `exclude`; returns (files,
    labels, how many were filtered out). Why: one class folder may hold several splits told apart by
    file name (FER2013: Training_, PublicTest_, PrivateTest_), and a published figure is on one of
    them."""
    inc, exc = _compile_filter(include, "--include"), _compile_filter(exclude, "--exclude")
    kept = [
        (f, y)
        for f, y in zip(files, labels)
        if (inc is None or inc.search(f.name)) and (exc is None or not exc.search(f.name))
    ]
    return [f for f, _ in kept], [y for _, y in kept], len(files) - len(kept)


def filter_label(include: str | None, exclude: str | None) -> str:
    """How the filter is shown next to the dataset's name ('' without one)."""
    parts = ([f"include {include}"] if include else []) + (
        [f"exclude {exclude}"] if exclude else []
    )
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class LabelledInputs:
    """The files of a labelled class-folder dataset an evaluation scores, and what it left out."""

    files: list[Path]
    labels: list[int]
    unknown_folders: list[str]  # folders that are not a class of the model
    filtered_out: int  # files the --include/--exclude name filter left out

    def describe(self, data_dir: Path, include: str | None, exclude: str | None) -> dict:
        """The evaluation result's fields about its data."""
        label = filter_label(include, exclude)
        return {
            "dataset": f"{data_dir.name} ({label})" if label else data_dir.name,
            "data": str(data_dir),
            "n_files": len(self.files),
            "include": include,
            "exclude": exclude,
            "filtered_out": self.filtered_out,
            "skipped_folders": self.unknown_folders,
        }

    def decode(self, data_dir: Path, sizes: list[int]) -> LabelledPixels:
        """The files decoded at each input size, their labels, and the files that were not
        images (a one-line error when none was)."""
        pixels, kept, skipped = decode_images_at(self.files, sizes)
        if not kept:
            raise UserError(
                f"none of the {len(self.files)} files under {data_dir} could be decoded as an image"
            )
        label_of = dict(zip(self.files, self.labels))
        return LabelledPixels(
            pixels,
            np.array([label_of[p] for p in kept]),
            [{"path": str(p.relative_to(data_dir)), "reason": r} for p, r in skipped],
        )


@dataclasses.dataclass(frozen=True)
class LabelledPixels:
    """What an evaluation scores: pixels per input size, the true class of each image, and the
    files skipped as not images (the result's `skipped_files`)."""

    pixels: dict[int, np.ndarray]
    y_true: np.ndarray
    skipped_files: list[dict]


def labelled_inputs(
    data_dir: Path, classes: list[str], include: str | None, exclude: str | None
) -> LabelledInputs:
    """The files under DATA/<class>/ that name a model class and pass the file-name filter."""
    folders = _class_folders(data_dir)
    files, labels, unknown = _labelled_files(data_dir, folders, classes)
    files, labels, filtered_out = filter_files(files, labels, include, exclude)
    if not files:
        raise UserError(
            f"no file under {data_dir} passes the file-name filter "
            f"({filter_label(include, exclude)})"
        )
    return LabelledInputs(files, labels, unknown, filtered_out)


def check_evaluation_inputs(data_dir: Path, include: str | None, exclude: str | None) -> None:
    """Bad data or a bad regex fail here, before the (slow) model load."""
    _class_folders(data_dir)
    filter_files([], [], include, exclude)


def evaluate_folder(
    model_path: str | Path,
    data_dir: str | Path,
    batch_size: int = 32,
    n_boot: int = 1000,
    include: str | None = None,
    exclude: str | None = None,
) -> dict:
    """The full metric set (`fer.evaluate.metrics`) of a trained model on another labelled
    class-folder dataset.

    Folders that are not model classes and undecodable files are skipped and listed in the result.
    `include` / `exclude`: regular expressions on file names (searched, so anchor with ^ where
    meant).
    """
    data_dir = Path(data_dir)
    check_evaluation_inputs(data_dir, include, exclude)
    predict, classes, size, backbone, _ = load_for_prediction(model_path)
    from fer.evaluate.metrics import classification_metrics

    inputs = labelled_inputs(data_dir, classes, include, exclude)
    images = inputs.decode(data_dir, [size])
    probs = predict(images.pixels[size], batch_size)
    return {
        "model": str(Path(model_path)),
        "backbone": backbone,
        **inputs.describe(data_dir, include, exclude),
        "skipped_files": images.skipped_files,
        "metrics": classification_metrics(images.y_true, probs, classes, n_boot=n_boot),
    }


def default_evaluation_path(
    model_paths: str | Path | list[str | Path],
    data_dir: str | Path,
    include: str | None = None,
    exclude: str | None = None,
) -> Path | None:
    """results/<study>/evaluations/<backbone>__<dataset>[__<filter>].json when the model is a
    study's best model (`ensemble-of-N__...` when several best models of one study are evaluated
    together); None otherwise. The report picks up every JSON in results/<study>/evaluations/.
    """
    from fer.core.study_folder import find_study

    paths = [model_paths] if isinstance(model_paths, str | Path) else list(model_paths)
    folders, roots = [], set()
    for model_path in paths:
        path = Path(model_path).resolve()
        folder = path if path.is_dir() else path.parent
        study = find_study(folder)
        if folder.parent.name != names.BEST_DIR or study is None or not study.has_results:
            return None
        folders.append(folder)
        roots.add(study.root)
    if len(roots) != 1:
        return None
    stem = folders[0].name if len(folders) == 1 else f"ensemble-of-{len(folders)}"
    name = f"{stem}__{_safe_stem(Path(Path(data_dir).resolve().name))}"
    if include or exclude:
        name += "__" + re.sub(r"[^A-Za-z0-9]+", "-", filter_label(include, exclude)).strip("-")[:80]
    return roots.pop() / names.EVALUATIONS_DIR / f"{name}.json"
