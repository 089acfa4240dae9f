"""Custom layers that live inside the saved model, so `model.keras` takes raw 0-255 RGB pixels.

Doing each backbone's preprocessing in-model (rather than `preprocess_input` on NumPy arrays) means the
same uint8 pixel cache feeds every backbone, nothing is overwritten in place (STACK-NOTES pitfall 7), and
`fer-study predict` cannot forget a step. Written with `keras.ops`, so it runs on any Keras backend.
"""

from __future__ import annotations

import keras
from keras import ops

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="fer")
class Preprocess(keras.layers.Layer):
    """Scale 0-255 RGB the way a backbone was trained.

    modes: raw (EfficientNet rescales itself), caffe (ResNet50: BGR, mean subtracted),
    tf (InceptionV3, MobileNet: [-1, 1]), torch (DenseNet: ImageNet mean/std).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("raw", "caffe", "tf", "torch"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "raw":
            return x
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
        return (x / 255.0 - mean) / std

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def augmentation_layers(strength: float, seed: int) -> list[keras.layers.Layer]:
    """The published augmentation (small rotation, shifts, zoom, horizontal flip) scaled by `strength`.

    Keras random layers are identity at inference, so they only ever touch training batches.
    strength 1 = rotation +-0.05 turns (18 degrees), shifts and zoom +-10%.
    """
    if strength <= 0:
        return []
    s = float(strength)
    return [
        keras.layers.RandomFlip("horizontal", seed=seed, name="aug_flip"),
        keras.layers.RandomRotation(min(0.05 * s, 0.5), fill_mode="nearest", seed=seed + 1, name="aug_rotate"),
        keras.layers.RandomTranslation(min(0.1 * s, 0.9), min(0.1 * s, 0.9), fill_mode="nearest",
                                       seed=seed + 2, name="aug_shift"),
        keras.layers.RandomZoom(min(0.1 * s, 0.9), fill_mode="nearest", seed=seed + 3, name="aug_zoom"),
    ]
