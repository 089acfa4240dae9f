"""Running an exported model with its own runtime (TensorFlow for SavedModel and TFLite, ONNX
Runtime for ONNX), so `predict` and `evaluate` take an export as they take a `model.keras`. Kept
apart from `fer.deploy.export` so loading an export does not import the exporters; runtimes are
imported lazily."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from fer.core.errors import UserError
from fer.core.names import EXPORT_FILE

FORMATS = ("saved_model", "tflite", "onnx")
EXPORT_JSON = EXPORT_FILE
BATCH = 64


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (runtimes' errors run to pages)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def find_export(path: str | Path) -> Path | None:
    """The export.json of an exported model given as its folder or its model file/folder; None
    otherwise."""
    path = Path(path)
    for candidate in (path / EXPORT_JSON, path.parent / EXPORT_JSON):
        if candidate.is_file():
            try:
                info = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and info.get("format") in FORMATS and "classes" in info:
                return candidate
    return None


class ExportedModel:
    """An exported model run by its own runtime: `predict(uint8 images) -> probabilities`."""

    def __init__(self, export_json: str | Path):
        self.info = json.loads(Path(export_json).read_text())
        self.folder = Path(export_json).parent
        self.format, self.classes = self.info["format"], list(self.info["classes"])
        self.input_size = int(self.info["input_size"])
        self.path = self.folder / self.info["file"]
        if not self.path.exists():
            raise UserError(f"{export_json} names {self.info['file']}, which is missing")
        try:
            self._run = getattr(self, f"_open_{self.format}")()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserError(
                f"could not open the exported model {self.path}: {first_line(exc)}"
            ) from None

    def _open_saved_model(self):
        import tensorflow as tf

        self._loaded = tf.saved_model.load(str(self.path))  # keep it: its variables die with it
        return lambda x: self._loaded.serve(tf.constant(x)).numpy()

    def _open_onnx(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError(
                "running an ONNX export needs onnxruntime: pip install 'fer-study[onnx]'"
            ) from None
        session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]

    def _open_tflite(self):
        import tensorflow as tf

        with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice (ai_edge_litert)
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=str(self.path))
        inp, out = (
            interpreter.get_input_details()[0]["index"],
            interpreter.get_output_details()[0]["index"],
        )
        shape = [None]

        def run(x):
            if shape[0] != x.shape:  # the batch size changed: resize (cheap) and reallocate
                interpreter.resize_tensor_input(inp, list(x.shape))
                interpreter.allocate_tensors()
                shape[0] = x.shape
            interpreter.set_tensor(inp, x)
            interpreter.invoke()
            return interpreter.get_tensor(out).copy()

        return run

    def predict_batch(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities of one batch of uint8 images (n, S, S, 3)."""
        return np.asarray(self._run(np.ascontiguousarray(pixels, dtype=np.uint8)), dtype=np.float32)

    def predict(self, pixels: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return np.concatenate(
            [
                self.predict_batch(pixels[i : i + batch_size])
                for i in range(0, len(pixels), batch_size)
            ]
        )
