"""Grad-CAM and Grad-CAM++ heatmaps for fer models, and a deletion-curve check of their
faithfulness.

How: the model is split at the Grad-CAM target layer (the backbone's last spatial activation, named
per backbone in `fer.model.backbones`) into a feature model (image -> activations) and the head
(activations -> class logits). Works because the backbone sits flat in the model
(docs/pitfalls.md#flat-backbone). The class score is the pre-softmax logit of the explained class:
softmax probabilities saturate for confident predictions and would give near-zero gradients exactly
where we most want an explanation. Gradients come from `fer.runtime.gradients` (the only
backend-specific code), compiled once per model.

Faithfulness (deletion curve, Petsiuk et al. 2018): replace the most-highlighted pixels, a growing
fraction at a time, by the image's mean colour and watch the explained class's probability fall. A
heatmap that points at what the model uses makes it fall faster than removing pixels in random
order; we report the area under both curves (lower is faster).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from PIL import Image

from fer.core.errors import UserError
from fer.model.backbones import BACKBONES
from fer.model.build import is_backbone_layer
from fer.runtime.gradients import class_score_gradients

OUTPUT_LAYER = "head_out"


def target_layer_name(model: keras.Model) -> str:
    """The registry's Grad-CAM layer for this model's backbone (model name `fer_<backbone>`).

    Falls back to the last backbone layer with a spatial (4-D) output, for models built outside the
    registry.
    """
    backbone = BACKBONES.get(model.name.removeprefix("fer_"))
    names = {layer.name for layer in model.layers}
    if backbone is not None and backbone.gradcam_layer in names:
        return backbone.gradcam_layer
    spatial = [
        layer.name
        for layer in model.layers
        if is_backbone_layer(layer) and len(getattr(layer.output, "shape", ())) == 4
    ]
    if not spatial:
        raise UserError(f"model '{model.name}' has no spatial layer for Grad-CAM")
    return spatial[-1]


@dataclasses.dataclass
class Explanation:
    """Heatmaps for a batch of images, at image resolution, each scaled to [0, 1]."""

    probs: np.ndarray  # (N, K) class probabilities
    class_ids: np.ndarray  # (N,) the class each heatmap explains (default: the predicted one)
    gradcam: np.ndarray  # (N, H, W)
    gradcam_pp: np.ndarray  # (N, H, W)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


class GradCam:
    """Grad-CAM / Grad-CAM++ for one model; build once, then `explain` batches of 0-255 RGB
    images."""

    def __init__(self, model: keras.Model, layer_name: str | None = None):
        self.model = model
        self.layer_name = layer_name or target_layer_name(model)
        target = model.get_layer(self.layer_name)
        self.features = keras.Model(model.input, target.output, name="gradcam_features")
        self._grad_fn = class_score_gradients(self._head_logits_fn(model, target))
        self.image_size = tuple(model.input.shape[1:3])

    @staticmethod
    def _head_logits_fn(model: keras.Model, target: keras.layers.Layer):
        out_layer = (
            model.get_layer(OUTPUT_LAYER)
            if OUTPUT_LAYER in {layer.name for layer in model.layers}
            else None
        )
        if isinstance(out_layer, keras.layers.Dense):
            # logits = the output Dense layer without its softmax
            penultimate = keras.Model(target.output, out_layer.input, name="gradcam_head")

            def logits(activations):
                x = keras.ops.cast(penultimate(activations, training=False), "float32")
                return keras.ops.matmul(
                    x, keras.ops.cast(out_layer.kernel, "float32")
                ) + keras.ops.cast(out_layer.bias, "float32")

            return logits
        head = keras.Model(
            target.output, model.output, name="gradcam_head"
        )  # not ours: use log-probs

        def log_probs(activations):
            return keras.ops.log(
                keras.ops.cast(head(activations, training=False), "float32") + 1e-12
            )

        return log_probs

    def explain(
        self, images: np.ndarray, class_ids: np.ndarray | None = None, batch_size: int = 32
    ) -> Explanation:
        """Heatmaps for `images` (N, H, W, 3) 0-255; explain `class_ids`, by default the predicted
        class."""
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:3]) != self.image_size:
            raise UserError(
                f"Grad-CAM expects images of shape (N, {self.image_size[0]}, "
                f"{self.image_size[1]}, 3), got {images.shape}"
            )
        parts = [
            self._explain_batch(
                images[i : i + batch_size],
                None if class_ids is None else np.asarray(class_ids)[i : i + batch_size],
            )
            for i in range(0, len(images), batch_size)
        ]
        return Explanation(
            *(
                np.concatenate([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(Explanation)
            )
        )

    def _explain_batch(self, images: np.ndarray, class_ids: np.ndarray | None) -> Explanation:
        acts = np.asarray(
            self.features.predict_on_batch(images.astype("float32")), dtype=np.float32
        )
        if class_ids is None:
            class_ids = np.full(len(images), -1)  # -1: explain the predicted class
        grads, logits = self._grad_fn(acts, np.asarray(class_ids, np.int32))
        class_ids = np.where(np.asarray(class_ids) < 0, logits.argmax(axis=1), class_ids)
        size = images.shape[1:3]
        return Explanation(
            probs=_softmax(logits),
            class_ids=np.asarray(class_ids, np.int64),
            gradcam=_upsample(_gradcam(acts, grads), size),
            gradcam_pp=_upsample(_gradcam_pp(acts, grads), size),
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _gradcam(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Selvaraju et al. 2017: channel weights = spatially averaged gradients."""
    weights = grads.mean(axis=(1, 2))
    return np.maximum(np.einsum("nhwc,nc->nhw", acts, weights), 0.0)


def _gradcam_pp(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Chattopadhay et al. 2018, closed form for score exp(logit): higher derivatives from first
    ones."""
    g2, g3 = grads**2, grads**3
    denom = 2.0 * g2 + acts.sum(axis=(1, 2), keepdims=True) * g3
    alpha = g2 / np.where(denom != 0.0, denom, 1.0)
    weights = (alpha * np.maximum(grads, 0.0)).sum(axis=(1, 2))
    return np.maximum(np.einsum("nhwc,nc->nhw", acts, weights), 0.0)


def _upsample(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of each (h, w) map to the image size, scaled to [0, 1] (all-zero maps stay
    zero)."""
    out = np.empty((len(cams), *size), np.float32)
    for i, cam in enumerate(cams):
        big = np.asarray(
            Image.fromarray(cam.astype(np.float32), mode="F").resize(
                (size[1], size[0]), Image.BILINEAR
            )
        )
        top = big.max()
        out[i] = big / top if top > 0 else 0.0
    return out


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image (H, W, 3) 0-255 with `heat` (H, W) in [0, 1] drawn over it in the 'jet' colours."""
    from matplotlib import colormaps

    colours = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    mixed = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * colours
    return np.clip(mixed, 0, 255).astype(np.uint8)


def deletion_curves(
    model: keras.Model,
    images: np.ndarray,
    heats: dict[str, np.ndarray],
    class_ids: np.ndarray,
    steps: int = 10,
    seed: int = 0,
    per_image: bool = False,
) -> dict[str, np.ndarray]:
    """Mean probability of `class_ids` as the top 0, 1/steps, ..., 100% pixels are replaced, per
    ordering.

    `heats` maps a name (e.g. 'gradcam') to (N, H, W) heatmaps; a 'random' ordering is always added
    as the reference. Removed pixels take the image's mean colour. Returns name -> (steps + 1,)
    curve, or with `per_image` name -> (N, steps + 1) curves (for intervals over images).
    """
    rng = np.random.default_rng(seed)
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    fractions = np.linspace(0.0, 1.0, steps + 1)
    orders = {
        name: np.argsort(-(heat.reshape(n, -1) + 1e-6 * rng.random((n, h * w))), axis=1)
        for name, heat in heats.items()
    }
    orders["random"] = np.stack([rng.permutation(h * w) for _ in range(n)])
    variants = np.empty((len(orders), n, steps + 1, h * w, 3), images.dtype)
    for k, order in enumerate(orders.values()):
        for i, (image, pixel_order) in enumerate(zip(images, order)):
            flat = image.reshape(-1, 3)
            baseline = flat.mean(axis=0).astype(images.dtype)
            for j, frac in enumerate(fractions):
                variants[k, i, j] = flat
                variants[k, i, j, pixel_order[: int(round(frac * h * w))]] = baseline
    # one predict call for every variant: one compiled function, not one per ordering
    probs = model.predict(variants.reshape(-1, h, w, 3), batch_size=64, verbose=0)
    probs = probs.reshape(len(orders), n, steps + 1, -1)
    curves = {
        name: probs[k, np.arange(n), :, np.asarray(class_ids)] for k, name in enumerate(orders)
    }
    return curves if per_image else {name: c.mean(axis=0) for name, c in curves.items()}


def deletion_auc(curve: np.ndarray) -> float | np.ndarray:
    """Area under a deletion curve sampled evenly on [0, 1] (trapezoid rule); lower = faster drop.
    For (N, steps + 1) curves, the N areas."""
    curve = np.asarray(curve, np.float64)
    areas = ((curve[..., 1:] + curve[..., :-1]) / 2.0).mean(axis=-1)
    return float(areas) if curve.ndim == 1 else areas


def _box_mask(shape: tuple[int, int], boxes) -> np.ndarray:
    h, w = shape
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        mask[
            int(np.floor(y0 * h)) : int(np.ceil(y1 * h)),
            int(np.floor(x0 * w)) : int(np.ceil(x1 * w)),
        ] = True
    return mask


def heat_share_in_boxes(
    heat: np.ndarray, boxes: list[tuple[float, float, float, float]]
) -> tuple[float, float]:
    """(share of the heat inside the union of `boxes`, share of the image area they cover).

    Boxes are (x0, y0, x1, y1) as fractions of width and height, like `demo_regions.csv`.
    """
    mask = _box_mask(heat.shape, boxes)
    total = float(heat.sum())
    return (float(heat[mask].sum()) / total if total > 0 else 0.0), float(mask.mean())


def heat_in_regions(
    heats: np.ndarray, boxes: list[list[tuple[float, float, float, float]]]
) -> dict:
    """Over N heatmaps with their own region boxes: the mean share of the heat inside the regions,
    the mean share of the image they cover, and the ratio of the two (1 = no better than heat spread
    evenly)."""
    pairs = np.array([heat_share_in_boxes(h, b) for h, b in zip(heats, boxes)], np.float64).reshape(
        -1, 2
    )
    share, area = (
        (float(v) for v in pairs.mean(axis=0)) if len(pairs) else (float("nan"), float("nan"))
    )
    return {
        "images": len(pairs),
        "heat_share": share,
        "area_share": area,
        "ratio": share / area if area > 0 else float("nan"),
        "per_image": pairs[:, 0],
    }


def peak_in_boxes(heat: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> bool:
    """The "pointing game" (Zhang et al. 2016): does the hottest pixel fall inside one of
    `boxes`?"""
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(heat.max() > 0 and _box_mask(heat.shape, boxes)[y, x])


__all__ = [
    "GradCam",
    "Explanation",
    "target_layer_name",
    "overlay",
    "deletion_curves",
    "deletion_auc",
    "heat_share_in_boxes",
    "heat_in_regions",
    "peak_in_boxes",
]
