"""Statistics that say whether Grad-CAM maps explain the model: faithfulness both ways, a sanity
check, a "same map for every image" detector, a readable target layer, and where each class is read.

Why each (docs/results.md, the Grad-CAM appendix):
- deletion alone is fooled by out-of-distribution masking and can rank methods differently from
  insertion (Petsiuk et al. 2018), so both are computed with the SAME baseline (every removed / not
  yet inserted pixel takes the image's mean colour) and compared per image against random order
  (paired bootstrap: the same images are scored by every order);
- maps that barely change when the weights are randomised do not explain the model (Adebayo et al.
  2018): `randomisation_check` re-draws the head, then deeper and deeper backbone layers (cascading,
  from the top), and measures the Spearman rank correlation of each randomised model's maps with the
  trained model's;
- a target layer with 3x3 cells gives the same few bands on every image: `readable_layer` picks the
  deepest layer with at least 7x7 cells, and `map_similarity` detects maps that hardly differ
  between images.

Plain NumPy on top of `fer.explain.gradcam` (Keras only to predict and to read/assign weights); no
Ray.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from fer.evaluate.compare import bootstrap_mean, paired_bootstrap
from fer.explain.gradcam import GradCam, _box_mask, target_layer_name
from fer.model.build import is_backbone_layer

BASELINE = (
    "the image's mean colour"  # stated in the report: what removed / not yet inserted pixels become
)
SAME_MAP_RHO = (
    0.8  # median rank correlation between different images' maps above this: "the same map"
)
SANITY_RHO = 0.5  # median rank correlation with the fully randomised model's maps above this: fails


# ------------------------------------------------------------ faithfulness: deletion and insertion
def faithfulness_curves(
    model: keras.Model,
    images: np.ndarray,
    heats: dict[str, np.ndarray],
    class_ids,
    *,
    steps: int = 8,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-image deletion AND insertion curves of the explained class's probability, for every
    ordering in `heats` (name -> (N, H, W)) plus 'random'. Returns {'deletion': {name: (N,
    steps+1)}, 'insertion': ...}.

    Deletion: the top 0, 1/steps, ..., 100% pixels of the ordering take the baseline colour.
    Insertion: start from the all-baseline image and restore the top fraction of pixels. One predict
    call per image chunk for every variant (one compiled function)."""
    images = np.asarray(images)
    n, h, w = images.shape[:3]
    orders = _pixel_orders(heats, n, h * w, np.random.default_rng(seed))
    counts = np.round(np.linspace(0.0, 1.0, steps + 1) * h * w).astype(int)
    class_ids = np.asarray(class_ids)
    out = {
        "deletion": {k: np.empty((n, steps + 1)) for k in orders},
        "insertion": {k: np.empty((n, steps + 1)) for k in orders},
    }
    for start in range(0, n, 16):  # bounded memory at 224 px
        chunk = list(range(start, min(n, start + 16)))
        variants = _masked_variants(images, chunk, orders, counts)
        probs = np.asarray(
            model.predict(variants.reshape(-1, h, w, 3), batch_size=batch_size, verbose=0)
        )
        probs = probs.reshape(2, len(orders), len(chunk), steps + 1, -1)
        for m, mode in enumerate(("deletion", "insertion")):
            for k, name in enumerate(orders):
                out[mode][name][chunk] = probs[m, k, np.arange(len(chunk)), :, class_ids[chunk]]
    return out


def _pixel_orders(heats: dict, n: int, pixels: int, rng: np.random.Generator) -> dict:
    """Per ordering, each image's pixels hottest first (ties broken at random), plus 'random'."""
    orders = {
        name: np.argsort(
            -(np.asarray(heat).reshape(n, -1) + 1e-6 * rng.random((n, pixels))), axis=1
        )
        for name, heat in heats.items()
    }
    orders["random"] = np.stack([rng.permutation(pixels) for _ in range(n)])
    return orders


def _masked_variants(images: np.ndarray, chunk: list[int], orders: dict, counts) -> np.ndarray:
    """(2, orderings, images, steps + 1, pixels, 3): per image of `chunk`, deletion (0) and
    insertion (1) variants at each count of its top pixels; the baseline is the image's mean
    colour."""
    n_pixels = images.shape[1] * images.shape[2]
    variants = np.empty((2, len(orders), len(chunk), len(counts), n_pixels, 3), np.float32)
    for i_local, i in enumerate(chunk):
        flat = images[i].reshape(-1, 3).astype(np.float32)
        base = flat.mean(axis=0)
        for k, order in enumerate(orders.values()):
            for j, c in enumerate(counts):
                variants[0, k, i_local, j] = flat
                variants[0, k, i_local, j, order[i][:c]] = base
                variants[1, k, i_local, j] = base
                variants[1, k, i_local, j, order[i][:c]] = flat[order[i][:c]]
    return variants


def curve_area(curves: np.ndarray) -> np.ndarray:
    """Per-image area under curves sampled evenly on [0, 1] (trapezoid rule)."""
    c = np.asarray(curves, np.float64)
    return ((c[..., 1:] + c[..., :-1]) / 2.0).mean(axis=-1)


def faithfulness_table(curves: dict[str, dict[str, np.ndarray]], n_boot: int = 2000) -> list[dict]:
    """One row per (metric, method): mean AUC with its 95% bootstrap interval over images, and for
    the heatmap methods the paired difference to random order (per image, same images) with its
    interval and a verdict. Deletion: lower is better; insertion: higher is better."""
    rows = []
    for mode, by_name in curves.items():
        areas = {name: curve_area(c) for name, c in by_name.items()}
        for name, a in areas.items():
            mean, lo, hi = bootstrap_mean(a, n_boot=n_boot)
            row = {
                "metric": mode,
                "method": name,
                "images": len(a),
                "AUC": mean,
                "AUC lo": lo,
                "AUC hi": hi,
            }
            if name != "random":
                d, dlo, dhi = paired_bootstrap(a, areas["random"], n_boot=n_boot)
                better = dhi < 0 if mode == "deletion" else dlo > 0
                worse = dlo > 0 if mode == "deletion" else dhi < 0
                row.update(
                    {
                        "minus random": d,
                        "diff lo": dlo,
                        "diff hi": dhi,
                        "vs random": "better"
                        if better
                        else "worse"
                        if worse
                        else "not distinguishable",
                    }
                )
            rows.append(row)
    return rows


def disagreements(rows: list[dict]) -> list[str]:
    """Methods for which deletion and insertion reach different verdicts against random (plain
    sentences)."""
    verdict = {
        (r["metric"], r["method"]): r.get("vs random") for r in rows if r["method"] != "random"
    }
    out = []
    for method in sorted({m for _, m in verdict}):
        d, i = verdict.get(("deletion", method)), verdict.get(("insertion", method))
        if d and i and d != i:
            out.append(f"{method}: against random order deletion says '{d}', insertion says '{i}'")
    return out


# ---------------------------------------------------------------- rank correlations between maps
def _cells(maps: np.ndarray, cells: int = 14) -> np.ndarray:
    """(N, H, W) maps averaged into (N, cells*cells) blocks: the rank correlation of upsampled maps
    is dominated by interpolation, and blocks make it cheap."""
    maps = np.asarray(maps, np.float64)
    n, h, w = maps.shape
    ys = np.linspace(0, h, min(cells, h) + 1).astype(int)
    xs = np.linspace(0, w, min(cells, w) + 1).astype(int)
    return (
        np.stack(
            [
                [
                    maps[:, ys[a] : ys[a + 1], xs[b] : xs[b + 1]].mean(axis=(1, 2))
                    for b in range(len(xs) - 1)
                ]
                for a in range(len(ys) - 1)
            ]
        )
        .reshape(-1, n)
        .T
    )


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank, as in Spearman's rho)."""
    out = np.empty_like(x, dtype=np.float64)
    for i, row in enumerate(x.reshape(-1, x.shape[-1])):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        out.reshape(-1, x.shape[-1])[i] = (ends - (counts - 1) / 2.0)[inverse]
    return out


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho between matching rows of a and b (N, D). Two constant rows count as identical
    (1.0), one constant row as unrelated (0.0)."""
    ra, rb = _ranks(np.atleast_2d(a)), _ranks(np.atleast_2d(b))
    ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
    na, nb = np.sqrt((ra**2).sum(axis=1)), np.sqrt((rb**2).sum(axis=1))
    rho = (ra * rb).sum(axis=1) / np.where(na * nb > 0, na * nb, 1.0)
    return np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, rho))


def map_similarity(maps: np.ndarray, pairs: int = 200, seed: int = 0) -> dict:
    """Median Spearman rho between the maps of different images (random pairs); above SAME_MAP_RHO
    the method shows (nearly) the same map whatever the image."""
    cells = _cells(maps)
    n = len(cells)
    if n < 2:
        return {"images": n, "median_rho": float("nan"), "same_map": False}
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n  # never the same image
    rho = float(np.median(spearman_rows(cells[i], cells[j])))
    return {"images": n, "median_rho": rho, "same_map": rho > SAME_MAP_RHO}


# ---------------------------------------------------------------- readable target layer
def readable_layer(model: keras.Model, min_cells: int = 7) -> tuple[str, tuple[int, int]]:
    """(layer name, (h, w)): the deepest backbone layer (not a padding layer) whose map has at least
    `min_cells` x `min_cells` cells at this input size and that cuts the model in two (the head
    depends on it alone, so Grad-CAM can split there), or the registry's layer when it already has
    enough cells or none does."""
    default = target_layer_name(model)

    def size(layer) -> tuple[int, int]:
        return tuple(int(s) for s in layer.output.shape[1:3])

    if min(size(model.get_layer(default))) >= min_cells:
        return default, size(model.get_layer(default))
    layers = [
        la
        for la in model.layers
        if is_backbone_layer(la) and len(getattr(la.output, "shape", ())) == 4
    ]
    for layer in reversed(layers):
        if min(size(layer)) < min_cells or isinstance(layer, keras.layers.ZeroPadding2D):
            continue  # a padding layer's extra cells are zeros, not evidence
        try:
            keras.Model(layer.output, model.output)  # a cut point: nothing else reaches the output
        except Exception:  # noqa: BLE001 - Keras raises ValueError variants for a disconnected graph
            continue
        return layer.name, size(layer)
    return default, size(model.get_layer(default))


# ---------------------------------------------------------------- model-randomisation sanity check
def randomisation_steps(model: keras.Model, n_backbone_steps: int = 3) -> list[tuple[str, list]]:
    """Cascading randomisation plan (Adebayo et al. 2018): [(label, layers randomised so far)],
    first the head (the weighted layers outside the backbone), then the backbone's weighted layers
    from the top, in `n_backbone_steps` equal cumulative chunks (the last step: every weighted
    layer)."""
    # a HeadDropout's weights are its rate (fer.model.layers), not something learned: never re-drawn
    weighted = [
        la for la in model.layers if la.weights and not isinstance(la, keras.layers.Dropout)
    ]
    head = [la for la in weighted if not is_backbone_layer(la)]
    backbone = [la for la in weighted if is_backbone_layer(la)][::-1]
    steps, done = [("head", list(head))], list(head)
    for chunk in np.array_split(np.arange(len(backbone)), n_backbone_steps):
        done = done + [backbone[i] for i in chunk]
        steps.append((f"+top {len(done) - len(head)}/{len(backbone)} backbone layers", list(done)))
    return steps


def _scramble(layers, rng: np.random.Generator) -> None:
    """Re-draw the weights: every kernel from a zero-mean normal with the trained kernel's spread (a
    learned mean would survive a mere shuffle: a net whose filters all respond to brightness still
    does), every other tensor (biases, BatchNormalization's scales and positive variances) shuffled,
    so activations neither vanish nor explode."""
    for layer in layers:
        for v in layer.weights:
            value = np.asarray(keras.ops.convert_to_numpy(v))
            if v.name.endswith("kernel"):
                new = rng.normal(0.0, float(value.std()) or 1e-3, value.shape)
            else:
                new = rng.permutation(value.reshape(-1)).reshape(value.shape)
            v.assign(new.astype(value.dtype))


MapFn = Callable[[keras.Model, np.ndarray, np.ndarray], dict[str, np.ndarray]]


def gradcam_maps(layer_name: str | None = None) -> MapFn:
    """A MapFn (model, images, class_ids) -> {'Grad-CAM': (N, H, W), 'Grad-CAM++': (N, H, W)};
    builds a fresh GradCam each call (jax.jit bakes the weights into the compiled function)."""

    def maps(model, images, class_ids):
        e = GradCam(model, layer_name).explain(images, class_ids)
        return {"Grad-CAM": e.gradcam, "Grad-CAM++": e.gradcam_pp}

    return maps


def randomisation_check(
    model: keras.Model,
    images: np.ndarray,
    class_ids,
    map_fn: MapFn,
    n_backbone_steps: int = 3,
    seed: int = 0,
) -> dict:
    """Spearman rho (median over images) between each method's maps on the trained model and on each
    cascading-randomised model, for the SAME images and classes. A method fails when the median rho
    with the fully randomised model stays above SANITY_RHO. The model's weights are restored
    afterwards."""
    images, class_ids = np.asarray(images), np.asarray(class_ids)
    original = [np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights]
    trained = {name: _cells(m) for name, m in map_fn(model, images, class_ids).items()}
    curves = {name: [] for name in trained}
    labels = []
    rng = np.random.default_rng(seed)
    try:
        for label, layers in randomisation_steps(model, n_backbone_steps):
            for v, value in zip(model.weights, original):
                v.assign(value)
            _scramble(layers, rng)
            labels.append(label)
            for name, m in map_fn(model, images, class_ids).items():
                curves[name].append(float(np.median(spearman_rows(trained[name], _cells(m)))))
    finally:
        for v, value in zip(model.weights, original):
            v.assign(value)
    return {
        "images": len(images),
        "steps": labels,
        "median_rho": curves,
        "fails": {name: c[-1] > SANITY_RHO for name, c in curves.items()},
    }


# ---------------------------------------------------------------- where each class is read
def class_mean_maps(
    maps: np.ndarray, labels, predicted, classes: list[str]
) -> dict[str, tuple[np.ndarray, int]]:
    """class -> (mean map over its correctly classified images, how many), for classes with any."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    out = {}
    for c in classes:
        keep = (labels == c) & (predicted == c)
        if keep.any():
            out[c] = (np.asarray(maps)[keep].mean(axis=0), int(keep.sum()))
    return out


def region_stats(
    maps: np.ndarray, regions: list[dict[str, list]], labels, classes: list[str]
) -> list[dict]:
    """Per class: the mean share of the heat inside each named region (regions[i]: name -> boxes as
    fractions x0, y0, x1, y1, as in demo_regions.csv, docs/results.md) and the pointing-game hit
    rate (the hottest pixel inside any region), over the images of that class that have regions."""
    labels = np.asarray(labels)
    names = sorted({r for reg in regions for r in reg})
    rows = []
    for c in classes:
        idx = [i for i in range(len(maps)) if labels[i] == c and regions[i]]
        if not idx:
            continue
        row = {"class": c, "images": len(idx)}
        for r in names:
            shares = []
            for i in idx:
                total = float(maps[i].sum())
                mask = _box_mask(maps[i].shape, regions[i].get(r, []))
                shares.append(float(maps[i][mask].sum()) / total if total > 0 else 0.0)
            row[f"heat in {r}"] = float(np.mean(shares))
        hits = []
        for i in idx:
            y, x = np.unravel_index(int(np.argmax(maps[i])), maps[i].shape)
            boxes = [b for bs in regions[i].values() for b in bs]
            hits.append(bool(maps[i].max() > 0 and _box_mask(maps[i].shape, boxes)[y, x]))
        row["pointing hit rate"] = float(np.mean(hits))
        rows.append(row)
    return rows


__all__ = [
    "BASELINE",
    "SAME_MAP_RHO",
    "SANITY_RHO",
    "faithfulness_curves",
    "curve_area",
    "faithfulness_table",
    "disagreements",
    "spearman_rows",
    "map_similarity",
    "readable_layer",
    "randomisation_steps",
    "gradcam_maps",
    "randomisation_check",
    "class_mean_maps",
    "region_stats",
]
