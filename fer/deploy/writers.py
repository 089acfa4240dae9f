"""Writing one export format from a Keras model: SavedModel, ONNX, TFLite (float or quantized).

Every format gets the model's inference copy (`inference_copy`: no augmentation or dropout layers)
with a uint8 input signature, so the file takes what a camera gives. Keras 3's own `model.export`
writes the SavedModel and the ONNX file (the latter through tf2onnx, the optional `onnx` extra);
TFLite is `tf.lite.TFLiteConverter.from_saved_model` on that SavedModel, where float16 and int8
quantization are converter options. TensorFlow and the ONNX packages are imported lazily, only here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from fer.core.errors import UserError
from fer.deploy.exported import first_line


def _input_spec(size: int):
    import keras

    return keras.InputSpec(shape=(None, size, size, 3), dtype="uint8")


def inference_copy(model):
    """The model with its augmentation (`aug_*`) and Dropout layers replaced by identities, same
    weights.

    Both are identity at inference anyway; removing them also removes their random-seed state
    variables (uint32), which a JAX-backend SavedModel reads and writes on every call and the TFLite
    converter rejects."""
    import keras

    from fer.model.build import AUG_PREFIX

    def clone(layer):
        if layer.name.startswith(AUG_PREFIX) or isinstance(layer, keras.layers.Dropout):
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in copy.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return copy


def write_saved_model(model, path: Path) -> None:
    model.export(
        str(path),
        format="tf_saved_model",
        input_signature=[_input_spec(int(model.input_shape[1]))],
        verbose=False,
    )


def write_onnx(model, path: Path) -> None:
    import keras

    # Keras's ONNX export under JAX needs jax2onnx (not a dependency)
    if keras.backend.backend() != "tensorflow":
        raise UserError(
            "ONNX export runs on the TensorFlow backend: rerun with KERAS_BACKEND=tensorflow "
            "(model.keras files are backend-independent)"
        )
    try:
        # checked here so the error names the extra, not a deep import
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError:
        raise UserError(
            "ONNX export needs the optional packages: pip install 'fer-study[onnx]'"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(
            str(path),
            format="onnx",
            input_signature=[_input_spec(int(model.input_shape[1]))],
            verbose=False,
        )


def write_tflite(
    saved_model: Path, path: Path, quantize: str | None, calibration: np.ndarray | None
) -> None:
    """TFLite from a SavedModel; float16 stores the weights as float16, int8 quantizes weights and
    activations (calibrated on `calibration` uint8 images, float fallback where an op has no int8
    kernel)."""
    import tensorflow as tf

    if quantize == "int8" and (calibration is None or not len(calibration)):
        raise UserError(
            "int8 quantization needs calibration images (the study's train and val splits are "
            "empty)"
        )
    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: (
                [calibration[i : i + 1]] for i in range(len(calibration))
            )
        path.write_bytes(converter.convert())
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; one line for the user
        what = f"{quantize} quantization" if quantize else "TFLite conversion"
        raise UserError(f"{what} failed: {first_line(exc)}") from None
