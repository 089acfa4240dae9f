"""The report's Grad-CAM appendix: what each backbone's best model looks at, and whether that is faithful.

Per backbone: for every class a few correctly and a few incorrectly classified test images (Grad-CAM and
Grad-CAM++ of the predicted class side by side), the most confident mistakes, and a deletion-curve
faithfulness check against random pixel removal with 95% intervals over images (up to 320 test images,
topped up with validation images when the test split is smaller: the check selects nothing, and on a
160-image test split one backbone's random-removal interval was too wide to separate from Grad-CAM's), and
where the data names its expression regions (the demo's demo_regions.csv) the share of Grad-CAM's heat
inside them. Bounded (a few images per class, at most 320 for faithfulness): seconds per backbone at 48 px
on a CPU, more for large backbones at 224 px (benchmarks/report_speed.py).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from fer import names
from study.report import figures

log = logging.getLogger(__name__)


def _select(pred: pd.DataFrame, classes: list[str], per_class: int, n_mistakes: int) -> tuple[dict, list[int]]:
    """Row indices: per class the most confident correct and incorrect ones; the most confident mistakes."""
    confidence = pred[[f"p_{c}" for c in classes]].max(axis=1)
    correct = pred["label"] == pred["predicted"]
    chosen = {}
    for cls in classes:
        of_class = pred["label"] == cls
        chosen[cls] = (list(confidence[of_class & correct].sort_values(ascending=False).index[:per_class]),
                       list(confidence[of_class & ~correct].sort_values(ascending=False).index[:per_class]))
    mistakes = list(confidence[~correct].sort_values(ascending=False).index[:n_mistakes])
    return chosen, mistakes


def _caption(pred: pd.DataFrame, row: int, classes: list[str], explained: str) -> str:
    label, predicted = pred.at[row, "label"], pred.at[row, "predicted"]
    p = pred.at[row, f"p_{predicted}"]
    prefix = f"{label}: " if label == predicted else f"{label}→{predicted} "
    return f"{prefix}p={p:.2f}\n{explained}"


def _backbone_appendix(doc, study, b, sd, per_class: int, n_mistakes: int, n_faithfulness: int,
                       regions: dict | None = None) -> dict | None:
    from fer.compare import bootstrap_mean
    from fer.gradcam import GradCam, deletion_auc, overlay
    from fer.predict import load_model_and_classes

    model, classes, _ = load_model_and_classes(b.folder)
    pred = pd.read_csv(b.folder / names.TEST_PREDICTIONS_FILE)
    size = int(model.input_shape[1])
    index_of = {p: i for i, p in enumerate(sd.paths("test"))}
    missing = [p for p in pred["path"] if p not in index_of]
    if missing:
        doc.warn(f"{b.name}: {len(missing)} test predictions do not match the study's test split "
                 f"(e.g. {missing[0]}); Grad-CAM skipped")
        return None
    pixels = sd.pixels("test", size)
    chosen, mistakes = _select(pred, classes, per_class, n_mistakes)
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(len(pred), size=min(n_faithfulness, len(pred)), replace=False).tolist())
    rows = sorted({r for pair in chosen.values() for side in pair for r in side} | set(mistakes) | set(sample))
    position = {r: i for i, r in enumerate(rows)}
    images = np.asarray(pixels[[index_of[pred.at[r, "path"]] for r in rows]])
    cam = GradCam(model)
    explanation = cam.explain(images)

    def panels(row: int):
        i = position[row]
        return [(overlay(images[i], explanation.gradcam[i]), _caption(pred, row, classes, "Grad-CAM")),
                (overlay(images[i], explanation.gradcam_pp[i]), _caption(pred, row, classes, "Grad-CAM++"))]

    def slots(row_ids: list[int]):
        out = []
        for k in range(per_class):
            out += panels(row_ids[k]) if k < len(row_ids) else [None, None]
        return out

    grid = [slots(chosen[c][0]) + slots(chosen[c][1]) for c in classes]
    column_titles = [f"correct #{k + 1}" if j == 0 else "" for k in range(per_class) for j in range(2)] + \
                    [f"incorrect #{k + 1}" if j == 0 else "" for k in range(per_class) for j in range(2)]
    doc.heading(f"{b.name} (target layer {cam.layer_name})", 3)
    doc.figure(f"gradcam_{b.name}", figures.image_grid(grid, f"{b.name}: per class, correct vs incorrect",
                                                       column_titles),
               f"{b.name}: Grad-CAM and Grad-CAM++ of the predicted class, one row per true class: the most "
               "confident correct (left) and incorrect (right) test images; empty where there are none")
    if mistakes:
        doc.figure(f"mistakes_{b.name}", figures.image_grid(
            [[p for r in mistakes for p in panels(r)[:1]]], f"{b.name}: most confident mistakes"),
            f"{b.name}: the {len(mistakes)} most confident mistakes (Grad-CAM of the wrongly predicted class)")
        table = pred.loc[mistakes, ["path", "label", "predicted"]].copy()
        table["confidence"] = [pred.at[r, f"p_{pred.at[r, 'predicted']}"] for r in mistakes]
        doc.table(table)
    else:
        doc.para(f"{b.name}: no mistakes on the test split.")

    idx = [position[r] for r in sample]
    curves = _deletion(model, images[idx], explanation, idx)
    n_val = 0
    if n_faithfulness > len(idx) and len(sd.labels("val")):  # a small test split: add validation images (the
        val = np.asarray(sd.pixels("val", size)[:n_faithfulness - len(idx)])  # check selects nothing)
        more = _deletion(model, val, cam.explain(val), np.arange(len(val)), seed=1000)
        curves, n_val = {k: np.concatenate([c, more[k]]) for k, c in curves.items()}, len(val)
    where = f"{len(idx)} test images" + (f" and {n_val} validation images" if n_val else "")
    doc.figure(f"deletion_{b.name}", figures.deletion_curves({k: c.mean(axis=0) for k, c in curves.items()},
                                                             b.name),
               f"{b.name}: deletion curves on {where} (lower area = the heatmap finds what the model uses faster "
               "than random removal)")
    # per image: the area above the fully deleted image's probability (the same end point for every ordering)
    areas = {name: deletion_auc(curve) - curve[:, -1] for name, curve in curves.items()}
    aucs = {name: bootstrap_mean(area) for name, area in areas.items()}
    row = {"backbone": b.name, "target layer": cam.layer_name, "images": where,
           **{f"deletion area {name} [95% CI]": f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]" for name, a in aucs.items()},
           **{f"{name} / random": aucs[name][0] / aucs["random"][0] if aucs["random"][0] > 0 else float("nan")
              for name in ("Grad-CAM", "Grad-CAM++")},
           "Grad-CAM beats random (intervals apart)": "yes" if aucs["Grad-CAM"][2] < aucs["random"][1] else "no"}
    if regions:  # the study's data names its expression regions (the demo's demo_regions.csv)
        row.update(region_heat(cam, pred, index_of, pixels, regions))
    return row


def _deletion(model, images, explanation, rows, seed: int = 0) -> dict:
    """Per-image deletion curves of Grad-CAM, Grad-CAM++ and random order for explanation[rows], in chunks of
    32 images (bounded memory at 224 px)."""
    from fer.gradcam import deletion_curves

    rows = np.asarray(rows)
    parts = [deletion_curves(model, images[chunk], {"Grad-CAM": explanation.gradcam[rows[chunk]],
                                                    "Grad-CAM++": explanation.gradcam_pp[rows[chunk]]},
                             explanation.class_ids[rows[chunk]], steps=8, seed=seed + i, per_image=True)
             for i, chunk in enumerate(np.array_split(np.arange(len(rows)), max(1, len(rows) // 32)))]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def region_boxes(sd) -> dict:
    """path -> region boxes from DATA/demo_regions.csv (written by fer.demo_data), or {} without one."""
    try:
        table = pd.read_csv(sd.source / "demo_regions.csv")
    except (OSError, ValueError):
        return {}
    return {path: list(g[["x0", "y0", "x1", "y1"]].itertuples(index=False, name=None))
            for path, g in table.groupby("path")}


def region_heat(cam, pred: pd.DataFrame, index_of: dict, pixels, regions: dict, limit: int = 400) -> dict:
    """Share of Grad-CAM's heat (predicted class) inside the known expression regions vs their share of the
    image, over the test images that have regions (up to `limit`)."""
    from fer.gradcam import heat_in_regions

    paths = [p for p in pred["path"] if p in regions][:limit]
    if not paths:
        return {}
    heat = cam.explain(np.asarray(pixels[sorted(index_of[p] for p in paths)])).gradcam
    ordered = sorted(paths, key=lambda p: index_of[p])
    result = heat_in_regions(heat, [regions[p] for p in ordered])
    return {"region images": result["images"], "Grad-CAM heat in regions": result["heat_share"],
            "regions' share of image": result["area_share"], "heat / area": result["ratio"]}


def gradcam_appendix(doc, study, per_class: int, n_mistakes: int, n_faithfulness: int) -> list[dict]:
    """Add the appendix to `doc`; returns the faithfulness rows (one per backbone explained)."""
    doc.heading("Appendix: Grad-CAM")
    doc.para("Heatmaps of the best model of each backbone on test images: where the evidence for the predicted "
             "class lies (Grad-CAM: Selvaraju et al. 2017; Grad-CAM++: Chattopadhay et al. 2018), at the "
             "backbone's last spatial layer. Faithfulness: the deletion curve replaces the most highlighted "
             "pixels first by the image's mean colour; a faithful heatmap makes the class probability fall "
             "faster than removing pixels in random order. 'Deletion area': per image, the area under the curve "
             "above the probability of the fully deleted image (the same end point for every order, so it "
             "compares orders, not images), averaged over the images with a 95% bootstrap interval; lower is "
             "faster, a ratio below 1 and intervals apart mean Grad-CAM finds what the model uses.")
    if not study.ok:
        doc.para("No tested best model: nothing to explain.")
        return []
    from fer.data import StudyData
    from fer.errors import UserError

    try:
        sd = StudyData(study.folder / names.DATA_DIR)
    except UserError as exc:
        doc.warn(f"Grad-CAM skipped: the study's prepared data cannot be opened ({exc})")
        return []
    rows, regions = [], region_boxes(sd)
    for b in study.ok:
        if not (b.folder / names.MODEL_FILE).is_file() or not (b.folder / names.TEST_PREDICTIONS_FILE).is_file():
            doc.warn(f"{b.name}: no {names.MODEL_FILE} or {names.TEST_PREDICTIONS_FILE} in its best folder; "
                     "Grad-CAM skipped")
            continue
        try:
            row = _backbone_appendix(doc, study, b, sd, per_class, n_mistakes, n_faithfulness, regions)
        except UserError as exc:
            doc.warn(f"{b.name}: Grad-CAM skipped: {exc}")
            continue
        if row:
            rows.append(row)
    if rows:
        doc.heading("Faithfulness (deletion curves)", 3)
        if regions:
            doc.para("This study's data comes with the regions that carry the expression (demo_regions.csv: "
                     "mouth, eyes, brows). 'heat / area' is the share of Grad-CAM's heat inside them divided by "
                     "their share of the image: 1 means heat spread evenly, above 1 heat on the expression.")
        doc.table(pd.DataFrame(rows))
    return rows
