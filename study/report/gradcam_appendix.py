"""The report's Grad-CAM appendix: what each backbone's best model looks at, and whether that is
faithful.

Per backbone: for every class a few correctly and a few incorrectly classified test images (Grad-CAM
and Grad-CAM++ of the predicted class side by side) at a target layer with >= 7x7 cells where the
backbone allows (fer.explain.map_checks.readable_layer), the most confident mistakes, and the checks
of study.report.appendix_checks (deletion and insertion against random order, paired; the
model-randomisation sanity check; the same-map test; the mean map per class; heat per expression
region), whose warnings come above the heatmaps. The faithfulness sample is up to 128 test images,
topped up with validation images when the test split is smaller (the checks select nothing; on a
160-image test split random order's interval was too wide to separate from Grad-CAM's). Bounded cost
(benchmarks/report_speed.py): target at most 60 s per backbone for MobileNetV2 at 96 px on a 2-core
CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pandas as pd

from fer.core import names
from study.report import appendix_checks, figures

log = logging.getLogger(__name__)


def _select(
    pred: pd.DataFrame, classes: list[str], per_class: int, n_mistakes: int
) -> tuple[dict, list[int]]:
    """Row indices: per class the most confident correct and incorrect ones; the most confident
    mistakes."""
    confidence = pred[[f"p_{c}" for c in classes]].max(axis=1)
    correct = pred["label"] == pred["predicted"]
    chosen = {}
    for cls in classes:
        of_class = pred["label"] == cls
        chosen[cls] = (
            list(confidence[of_class & correct].sort_values(ascending=False).index[:per_class]),
            list(confidence[of_class & ~correct].sort_values(ascending=False).index[:per_class]),
        )
    mistakes = list(confidence[~correct].sort_values(ascending=False).index[:n_mistakes])
    return chosen, mistakes


def _caption(pred: pd.DataFrame, row: int, classes: list[str], explained: str) -> str:
    label, predicted = pred.at[row, "label"], pred.at[row, "predicted"]
    p = pred.at[row, f"p_{predicted}"]
    prefix = f"{label}: " if label == predicted else f"{label}→{predicted} "
    return f"{prefix}p={p:.2f}\n{explained}"


def _backbone_appendix(
    doc,
    study,
    b,
    sd,
    per_class: int,
    n_mistakes: int,
    n_faithfulness: int,
    regions: dict | None = None,
    named: dict | None = None,
) -> dict | None:
    from fer.evaluate.predict import load_model_and_classes
    from fer.explain.gradcam import Explanation, GradCam, overlay
    from fer.explain.map_checks import readable_layer

    model, classes, _ = load_model_and_classes(b.folder)
    pred = pd.read_csv(b.folder / names.TEST_PREDICTIONS_FILE)
    size = int(model.input_shape[1])
    index_of = {p: i for i, p in enumerate(sd.paths("test"))}
    missing = [p for p in pred["path"] if p not in index_of]
    if missing:
        doc.warn(
            f"{b.name}: {len(missing)} test predictions do not match the study's test split "
            f"(e.g. {missing[0]}); Grad-CAM skipped"
        )
        return None
    pixels = sd.pixels("test", size)
    chosen, mistakes = _select(pred, classes, per_class, n_mistakes)
    rng = np.random.default_rng(0)
    sample = sorted(
        rng.choice(len(pred), size=min(n_faithfulness, len(pred)), replace=False).tolist()
    )
    rows = sorted(
        {r for pair in chosen.values() for side in pair for r in side} | set(mistakes) | set(sample)
    )
    position = {r: i for i, r in enumerate(rows)}
    images = np.asarray(pixels[[index_of[pred.at[r, "path"]] for r in rows]])
    layer, cells = readable_layer(
        model
    )  # >= 7x7 cells where the backbone allows (fer.explain.map_checks)
    cam = GradCam(model, layer)
    explanation = cam.explain(images)
    idx = [position[r] for r in sample]
    val = None
    if n_faithfulness > len(idx) and len(
        sd.labels("val")
    ):  # a small test split: add validation images (the
        val = np.asarray(
            sd.pixels("val", size)[: n_faithfulness - len(idx)]
        )  # checks select nothing)
    sub = Explanation(*(getattr(explanation, f.name)[idx] for f in dataclasses.fields(Explanation)))
    checks = appendix_checks.run_checks(
        model,
        cam,
        images[idx],
        sub,
        pred.loc[sample, "label"].to_numpy(),
        classes,
        val,
        [named.get(pred.at[r, "path"], {}) for r in sample] if named else None,
    )
    doc.heading(f"{b.name} (target layer {layer}, {cells[0]}x{cells[1]} cells at {size} px)", 3)
    for text in appendix_checks.warnings(b.name, checks):  # above the heatmaps, not below
        doc.warn(text)

    def panels(row: int):
        i = position[row]
        return [
            (overlay(images[i], explanation.gradcam[i]), _caption(pred, row, classes, "Grad-CAM")),
            (
                overlay(images[i], explanation.gradcam_pp[i]),
                _caption(pred, row, classes, "Grad-CAM++"),
            ),
        ]

    def slots(row_ids: list[int]):
        out = []
        for k in range(per_class):
            out += panels(row_ids[k]) if k < len(row_ids) else [None, None]
        return out

    grid = [slots(chosen[c][0]) + slots(chosen[c][1]) for c in classes]
    column_titles = [
        f"correct #{k + 1}" if j == 0 else "" for k in range(per_class) for j in range(2)
    ] + [f"incorrect #{k + 1}" if j == 0 else "" for k in range(per_class) for j in range(2)]
    doc.figure(
        f"gradcam_{b.name}",
        figures.image_grid(grid, f"{b.name}: per class, correct vs incorrect", column_titles),
        f"{b.name}: Grad-CAM and Grad-CAM++ of the predicted class, one row per true class: the most "
        "confident correct (left) and incorrect (right) test images; empty where there are none",
    )
    if mistakes:
        doc.figure(
            f"mistakes_{b.name}",
            figures.image_grid(
                [[p for r in mistakes for p in panels(r)[:1]]], f"{b.name}: most confident mistakes"
            ),
            f"{b.name}: the {len(mistakes)} most confident mistakes (Grad-CAM of the wrongly predicted class)",
        )
        table = pred.loc[mistakes, ["path", "label", "predicted"]].copy()
        table["confidence"] = [pred.at[r, f"p_{pred.at[r, 'predicted']}"] for r in mistakes]
        doc.table(table)
    else:
        doc.para(f"{b.name}: no mistakes on the test split.")

    appendix_checks.render(doc, b.name, checks)
    row = {"backbone": b.name, "methods": appendix_checks.summary_rows(checks)}
    if regions:  # the study's data names its expression regions (the demo's demo_regions.csv)
        row.update(region_heat(cam, pred, index_of, pixels, regions))
    return row


def region_boxes(sd) -> dict:
    """path -> region boxes from DATA/demo_regions.csv (written by fer.prepare.demo_data), or {}
    without one."""
    try:
        table = pd.read_csv(sd.source / "demo_regions.csv")
    except (OSError, ValueError):
        return {}
    return {
        path: list(g[["x0", "y0", "x1", "y1"]].itertuples(index=False, name=None))
        for path, g in table.groupby("path")
    }


def region_heat(
    cam, pred: pd.DataFrame, index_of: dict, pixels, regions: dict, limit: int = 400
) -> dict:
    """Share of Grad-CAM's heat (predicted class) inside the known expression regions vs their share
    of the image, over the test images that have regions (up to `limit`)."""
    from fer.explain.gradcam import heat_in_regions

    paths = [p for p in pred["path"] if p in regions][:limit]
    if not paths:
        return {}
    heat = cam.explain(np.asarray(pixels[sorted(index_of[p] for p in paths)])).gradcam
    ordered = sorted(paths, key=lambda p: index_of[p])
    result = heat_in_regions(heat, [regions[p] for p in ordered])
    return {
        "region images": result["images"],
        "Grad-CAM heat in regions": result["heat_share"],
        "regions' share of image": result["area_share"],
        "heat / area": result["ratio"],
    }


def gradcam_appendix(
    doc, study, per_class: int, n_mistakes: int, n_faithfulness: int
) -> list[dict]:
    """Add the appendix to `doc`; returns the faithfulness rows (one per backbone explained)."""
    doc.heading("Appendix: Grad-CAM")
    from fer.explain.map_checks import BASELINE, SAME_MAP_RHO, SANITY_RHO

    doc.para(
        "Heatmaps of the best model of each backbone on test images: where the evidence for the predicted "
        "class lies (Grad-CAM: Selvaraju et al. 2017; Grad-CAM++: Chattopadhay et al. 2018), at the deepest "
        "backbone layer with at least 7x7 cells at the study's input size (coarser maps give the same few "
        "bands on every image; the layer and its cells are named per backbone). Before the heatmaps are "
        "shown, three checks ask whether they explain the model. Faithfulness both ways (Petsiuk et al. "
        f"2018), with one baseline, {BASELINE}: deletion replaces the most highlighted pixels first (a "
        "faithful map makes the class probability fall faster than random order: lower area), insertion "
        "starts from the baseline image and restores them first (rise faster: higher area); per image areas, "
        "means with 95% bootstrap intervals over images, and each method minus random order per image "
        "(paired bootstrap: the same images). Deletion alone is fooled by out-of-distribution masking, so "
        "where the two disagree the report says so. Model-randomisation sanity check (Adebayo et al. 2018): "
        "the head, then more and more backbone layers from the top are re-drawn; maps whose median Spearman "
        f"rank correlation with the fully randomised model's stays above {SANITY_RHO} do not depend on what "
        f"the model learned. Same map for every image: median rank correlation between different images' "
        f"maps above {SAME_MAP_RHO}. A method failing any check gets a warning above its heatmaps."
    )
    if not study.ok:
        doc.para("No tested best model: nothing to explain.")
        return []
    from fer.core.errors import UserError
    from fer.data import StudyData

    try:
        sd = StudyData(study.folder / names.DATA_DIR)
    except UserError as exc:
        doc.warn(f"Grad-CAM skipped: the study's prepared data cannot be opened ({exc})")
        return []
    rows, regions, named = [], region_boxes(sd), appendix_checks.region_names(sd)
    for b in study.ok:
        if (
            not (b.folder / names.MODEL_FILE).is_file()
            or not (b.folder / names.TEST_PREDICTIONS_FILE).is_file()
        ):
            doc.warn(
                f"{b.name}: no {names.MODEL_FILE} or {names.TEST_PREDICTIONS_FILE} in its best folder; Grad-CAM skipped"
            )
            continue
        start, cpu = time.perf_counter(), time.process_time()
        try:
            row = _backbone_appendix(
                doc, study, b, sd, per_class, n_mistakes, n_faithfulness, regions, named
            )
        except UserError as exc:
            doc.warn(f"{b.name}: Grad-CAM skipped: {exc}")
            continue
        # read by benchmarks/report_speed.py (the appendix's cost per backbone)
        log.info(
            "gradcam appendix %s: %.2f s wall, %.2f s CPU",
            b.name,
            time.perf_counter() - start,
            time.process_time() - cpu,
        )
        if row:
            rows.append(row)
    if rows:
        doc.heading("Summary: faithfulness, sanity check, same-map test", 3)
        doc.para(
            "Per backbone and method: the verdict against random order (paired difference of the areas in "
            "brackets), the median rank correlation between different images' maps (same-map test) and with "
            "the fully randomised model's maps (sanity check); sample sizes in the 'images' column."
        )
        doc.table(
            pd.DataFrame([{"backbone": r["backbone"], **m} for r in rows for m in r["methods"]])
        )
        region_rows = [{k: v for k, v in r.items() if k != "methods"} for r in rows if len(r) > 2]
        if region_rows:
            doc.para(
                "This study's data comes with the regions that carry the expression (demo_regions.csv: "
                "mouth, eyes, brows). 'heat / area' is the share of Grad-CAM's heat inside them divided by "
                "their share of the image: 1 means heat spread evenly, above 1 heat on the expression."
            )
            doc.table(pd.DataFrame(region_rows))
    return rows
