"""Custom layers that live inside the saved model, so `model.keras` takes raw 0-255 RGB pixels.

Doing each backbone's preprocessing in-model (rather than `preprocess_input` on NumPy arrays) means
the same uint8 pixel cache feeds every backbone, nothing is overwritten in place
(docs/pitfalls.md#preprocess-input), and `fer-study predict` cannot forget a step. Written with
`keras.ops`, so it runs on any Keras backend.
"""

from __future__ import annotations

import math

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


@keras.saving.register_keras_serializable(package="fer")
class RandomAffine(keras.layers.Layer):
    """The published augmentation -- horizontal flip, rotation, shift, zoom -- as ONE affine
    resampling.

    Why not Keras's RandomFlip + RandomRotation + RandomTranslation + RandomZoom: each of the last
    three resamples the whole batch (bilinear, edge fill), so an image is interpolated three times
    (blurrier) and the augmentation costs three gathers per step. Here the four draws per image are
    the same as those layers make -- flip with probability 1/2, angle uniform in +-`rotation` turns,
    shifts uniform in +-`shift` of the height/width, zoom factor uniform in 1 +- `zoom` (both axes)
    -- composed into one output-to-input map about the image centre, sampled once (bilinear,
    nearest-edge fill). Identity at inference.
    """

    def __init__(
        self,
        rotation: float = 0.05,
        shift: float = 0.1,
        zoom: float = 0.1,
        flip: bool = True,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rotation, self.shift, self.zoom, self.flip, self.seed = (
            rotation,
            shift,
            zoom,
            flip,
            seed,
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, images, training=None):
        if not training:
            return images
        x = ops.cast(images, "float32")
        n = ops.shape(x)[0]
        height, width = x.shape[1], x.shape[2]

        def uniform(bound):
            return keras.random.uniform((n,), -bound, bound, seed=self.seed_generator)

        angle = uniform(self.rotation * 2.0 * math.pi)
        shift_x, shift_y = uniform(self.shift) * width, uniform(self.shift) * height
        scale = 1.0 + uniform(self.zoom)
        mirror = (
            ops.where(keras.random.uniform((n,), seed=self.seed_generator) < 0.5, -1.0, 1.0)
            if self.flip
            else ops.ones((n,))
        )
        # input point = c + D R (scale (p - c) - t), p an output point, c the centre, t the shift, R
        # the rotation, D the mirror (x -> -x about the centre): as flip, rotate, shift, zoom in a
        # row.
        cos, sin = ops.cos(angle), ops.sin(angle)
        a00, a01 = mirror * scale * cos, -mirror * scale * sin
        a10, a11 = scale * sin, scale * cos
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        b0 = cx - a00 * cx - a01 * cy - mirror * (cos * shift_x - sin * shift_y)
        b1 = cy - a10 * cx - a11 * cy - (sin * shift_x + cos * shift_y)
        zeros = ops.zeros((n,))
        transform = ops.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)
        out = ops.image.affine_transform(
            x, transform, interpolation="bilinear", fill_mode="nearest"
        )
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "rotation": self.rotation,
            "shift": self.shift,
            "zoom": self.zoom,
            "flip": self.flip,
            "seed": self.seed,
        }


def augmentation_layers(strength: float, seed: int) -> list[keras.layers.Layer]:
    """The published augmentation (small rotation, shifts, zoom, horizontal flip) scaled by
    `strength`.

    Random layers are identity at inference, so they only ever touch training batches. strength 1 =
    rotation +-0.05 turns (18 degrees), shifts and zoom +-10%.
    """
    if strength <= 0:
        return []
    s = float(strength)
    return [
        RandomAffine(
            rotation=min(0.05 * s, 0.5),
            shift=min(0.1 * s, 0.9),
            zoom=min(0.1 * s, 0.9),
            seed=seed,
            name="aug_affine",
        )
    ]


@keras.saving.register_keras_serializable(package="fer")
class HeadDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` whose rate is a VALUE held in non-trainable variables, not a constant
    baked into the compiled train step. So trials that differ only in `dropout` compile the same
    program, and under JAX a later trial finds it in the study's compilation cache
    (docs/pitfalls.md#baked-constants).

    Same seed, same numbers: it draws the same uniform noise from the same seed generator as Keras's
    Dropout and applies each backend's own rule bit for bit (TensorFlow's `stateless_dropout`: keep
    where u >= rate, multiply by 1/(1-rate); JAX's: keep where u < 1-rate, divide by 1-rate, u in
    float32), with 1-rate and 1/(1-rate) rounded from double precision as Keras's Python-float path
    does (tests/test_compile_reuse.py). At rate 0 it keeps a seed generator (created without
    touching Python's global random state, so the layers built after it get the same initial weights
    as before) and passes its input through unchanged (u >= 0 always; x * 1 exact), so a rate of 0
    compiles the same program too.
    """

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        super().__init__(rate, noise_shape=noise_shape, seed=seed, **kwargs)
        if not rate < 1:
            raise ValueError(f"HeadDropout needs a rate below 1, got {rate}")
        if not hasattr(
            self, "seed_generator"
        ):  # rate 0: Keras made none; one that leaves random's state alone
            import random

            state = random.getstate()
            self.seed_generator = keras.random.SeedGenerator(seed)
            random.setstate(state)

    def build(self, input_shape):
        # float32 and never autocast: the same comparisons under mixed precision as Keras's
        # float-rate path
        self._rate_vars = {
            name: self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(value),
                trainable=False,
                autocast=False,
                name=name,
                dtype="float32",
            )
            for name, value in _dropout_values(self.rate).items()
        }
        self.built = True

    def set_rate(self, rate: float) -> None:
        """Change the rate without changing the compiled program."""
        if not 0 <= rate < 1:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        if self.built:
            for name, value in _dropout_values(rate).items():
                self._rate_vars[name].assign(value)

    def call(self, inputs, training=False):
        if not training:
            return inputs
        shape = ops.shape(inputs) if self.noise_shape is None else self.noise_shape
        v = self._rate_vars
        if keras.backend.backend() == "jax":  # jax.random.bernoulli(p=1-rate): uniform float32 < p
            noise = keras.random.uniform(shape, dtype="float32", seed=self.seed_generator)
            keep = ops.broadcast_to(noise < v["keep"], ops.shape(inputs))
            return ops.where(
                keep, inputs / ops.cast(v["keep"], inputs.dtype), ops.zeros_like(inputs)
            )
        # tf.nn.experimental.stateless_dropout: uniform in the input's dtype >= rate, times
        # 1/(1-rate)
        noise = keras.random.uniform(shape, dtype=inputs.dtype, seed=self.seed_generator)
        keep = noise >= ops.cast(v["rate"], inputs.dtype)
        return ops.where(keep, inputs * ops.cast(v["scale"], inputs.dtype), ops.zeros_like(inputs))


def _dropout_values(rate: float) -> dict[str, float]:
    """What the dropout step reads, computed in double precision (as Keras does from a Python
    float)."""
    rate = float(rate)
    return {"rate": rate, "keep": 1.0 - rate, "scale": 1.0 / (1.0 - rate)}
