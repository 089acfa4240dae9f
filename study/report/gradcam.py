"""The report's Grad-CAM appendix: what each backbone's best model looks at, and whether that is faithful.

Per backbone: for every class a few correctly and a few incorrectly classified test images (Grad-CAM and
Grad-CAM++ of the predicted class side by side), the most confident mistakes, and a deletion-curve
faithfulness number against random pixel removal. Bounded (a few images per class, a small faithfulness
sample), so the appendix costs seconds per backbone on a CPU.
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


def _backbone_appendix(doc, study, b, sd, per_class: int, n_mistakes: int, n_faithfulness: int) -> dict | None:
    from fer.gradcam import GradCam, deletion_auc, deletion_curves, overlay
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
    curves = deletion_curves(model, images[idx], {"Grad-CAM": explanation.gradcam[idx],
                                                  "Grad-CAM++": explanation.gradcam_pp[idx]},
                             explanation.class_ids[idx], steps=8)
    doc.figure(f"deletion_{b.name}", figures.deletion_curves(curves, b.name),
               f"{b.name}: deletion curves on {len(idx)} test images (lower area = the heatmap finds what the "
               "model uses faster than random removal)")
    aucs = {name: deletion_auc(curve) for name, curve in curves.items()}
    return {"backbone": b.name, "target layer": cam.layer_name, "images": len(idx),
            "deletion AUC Grad-CAM": aucs["Grad-CAM"], "deletion AUC Grad-CAM++": aucs["Grad-CAM++"],
            "deletion AUC random": aucs["random"],
            **{f"{name} / random": aucs[name] / aucs["random"] if aucs["random"] > 0 else float("nan")
               for name in ("Grad-CAM", "Grad-CAM++")}}


def gradcam_appendix(doc, study, per_class: int, n_mistakes: int, n_faithfulness: int) -> list[dict]:
    """Add the appendix to `doc`; returns the faithfulness rows (one per backbone explained)."""
    doc.heading("Appendix: Grad-CAM")
    doc.para("Heatmaps of the best model of each backbone on test images: where the evidence for the predicted "
             "class lies (Grad-CAM: Selvaraju et al. 2017; Grad-CAM++: Chattopadhay et al. 2018), at the "
             "backbone's last spatial layer. Faithfulness: the deletion curve replaces the most highlighted "
             "pixels first by the image's mean colour; a faithful heatmap makes the class probability fall "
             "faster (lower area under the curve) than removing pixels in random order (ratio below 1).")
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
    rows = []
    for b in study.ok:
        if not (b.folder / names.MODEL_FILE).is_file() or not (b.folder / names.TEST_PREDICTIONS_FILE).is_file():
            doc.warn(f"{b.name}: no {names.MODEL_FILE} or {names.TEST_PREDICTIONS_FILE} in its best folder; "
                     "Grad-CAM skipped")
            continue
        try:
            row = _backbone_appendix(doc, study, b, sd, per_class, n_mistakes, n_faithfulness)
        except UserError as exc:
            doc.warn(f"{b.name}: Grad-CAM skipped: {exc}")
            continue
        if row:
            rows.append(row)
    if rows:
        doc.heading("Faithfulness (deletion curves)", 3)
        doc.table(pd.DataFrame(rows))
    return rows
