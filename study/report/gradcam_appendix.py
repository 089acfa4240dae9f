"""The report's Grad-CAM appendix: what each backbone's best model looks at, and whether that is
faithful.

Per backbone: for every class a few correctly and a few incorrectly classified test images (Grad-CAM
and Grad-CAM++ of the predicted class side by side) at a target layer with >= 7x7 cells where the
backbone allows (fer.explain.map_checks.readable_layer), the most confident mistakes, and the checks
of study.report.appendix_checks (deletion and insertion against random order, paired; the
model-randomisation sanity check; the same-map test; the mean map per class; heat per expression
region), whose warnings come above the heatmaps. The faithfulness sample is up to 128 test images,
topped up with validation images when the test split is smaller: a small sample leaves random
order's interval too wide to tell the methods apart, and the checks select nothing. Its cost per
backbone is logged, and measured by benchmarks/report_speed.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from fer.core import names
from study.report import appendix_checks, figures

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AppendixSettings:
    """How much the appendix shows and checks per backbone."""

    per_class: int  # correct and incorrect test images shown per class
    n_mistakes: int  # most confident mistakes shown
    n_faithfulness: int  # images in the faithfulness sample


@dataclasses.dataclass(frozen=True)
class _StudyImages:
    """The study's prepared data, opened once for every backbone, and the expression regions its
    images come with (empty without a regions file)."""

    data: Any  # fer.data.StudyData
    regions: dict  # path -> boxes (region_boxes)
    named: dict  # path -> {region: boxes} (appendix_checks.region_names)


@dataclasses.dataclass(frozen=True)
class _TestSet:
    """A backbone's best model and its test predictions, lined up with the study's test split."""

    model: Any
    classes: list[str]
    pred: pd.DataFrame  # test_predictions.csv
    size: int  # the model's input size
    index_of: dict  # test image path -> its index in the study's test split
    pixels: Any  # the test split's pixels at `size`


@dataclasses.dataclass(frozen=True)
class _Selection:
    """The test rows (of `pred`) the appendix shows or checks."""

    chosen: dict  # class -> (correct rows, incorrect rows), most confident first
    mistakes: list[int]  # the most confident mistakes
    sample: list[int]  # the faithfulness sample

    @property
    def rows(self) -> list[int]:
        """Every selected row once, in order: the images explained."""
        shown = {r for pair in self.chosen.values() for side in pair for r in side}
        return sorted(shown | set(self.mistakes) | set(self.sample))


@dataclasses.dataclass(frozen=True)
class _Panels:
    """Overlays of the explained images, captioned, by test row."""

    pred: pd.DataFrame
    classes: list[str]
    images: np.ndarray  # the explained images, in `_Selection.rows` order
    explanation: Any  # fer.explain.gradcam.Explanation of `images`
    position: dict  # test row -> index in `images`

    def of(self, row: int) -> list:
        """Grad-CAM and Grad-CAM++ of one test image."""
        from fer.explain.gradcam import overlay

        i, pred, classes = self.position[row], self.pred, self.classes
        return [
            (
                overlay(self.images[i], self.explanation.gradcam[i]),
                _caption(pred, row, classes, "Grad-CAM"),
            ),
            (
                overlay(self.images[i], self.explanation.gradcam_pp[i]),
                _caption(pred, row, classes, "Grad-CAM++"),
            ),
        ]

    def slots(self, row_ids: list[int], per_class: int) -> list:
        """`per_class` pairs of panels, empty where there are fewer images."""
        out = []
        for k in range(per_class):
            out += self.of(row_ids[k]) if k < len(row_ids) else [None, None]
        return out


def gradcam_appendix(
    doc, study, per_class: int, n_mistakes: int, n_faithfulness: int
) -> list[dict]:
    """Add the appendix to `doc`; returns the faithfulness rows (one per backbone explained)."""
    doc.heading("Appendix: Grad-CAM")
    _introduction(doc)
    if not study.ok:
        doc.para("No tested best model: nothing to explain.")
        return []
    images = _open_study_images(doc, study)
    if images is None:
        return []
    settings = AppendixSettings(per_class, n_mistakes, n_faithfulness)
    rows = []
    for b in study.ok:
        row = _timed_backbone_appendix(doc, b, images, settings)
        if row:
            rows.append(row)
    if rows:
        _summary(doc, rows)
    return rows


def _introduction(doc) -> None:
    """What the heatmaps show and the three checks they must pass, with the thresholds used."""
    from fer.explain.map_checks import BASELINE, SAME_MAP_RHO, SANITY_RHO

    doc.para(
        "Heatmaps of the best model of each backbone on test images: where the evidence for the "
        "predicted class lies (Grad-CAM: Selvaraju et al. 2017; Grad-CAM++: Chattopadhay et al. "
        "2018), at the deepest backbone layer with at least 7x7 cells at the study's input size "
        "(coarser maps give the same few bands on every image; the layer and its cells are named "
        "per backbone). Before the heatmaps are shown, three checks ask whether they explain the "
        f"model. Faithfulness both ways (Petsiuk et al. 2018), with one baseline, {BASELINE}: "
        "deletion replaces the most highlighted pixels first (a faithful map makes the class "
        "probability fall faster than random order: lower area), insertion starts from the "
        "baseline image and restores them first (rise faster: higher area); per image areas, means "
        "with 95% bootstrap intervals over images, and each method minus random order per image "
        "(paired bootstrap: the same images). Deletion alone is fooled by out-of-distribution "
        "masking, so where the two disagree the report says so. Model-randomisation sanity check "
        "(Adebayo et al. 2018): the head, then more and more backbone layers from the top are "
        "re-drawn; maps whose median Spearman rank correlation with the fully randomised model's "
        f"stays above {SANITY_RHO} do not depend on what the model learned. Same map for every "
        "image: median rank correlation between different images' maps above "
        f"{SAME_MAP_RHO}. A method failing any check gets a warning above its heatmaps."
    )


def _open_study_images(doc, study) -> _StudyImages | None:
    """The study's prepared data and regions, or None (with a warning) when it cannot be opened."""
    from fer.core.errors import UserError
    from fer.data import StudyData

    try:
        data = StudyData(study.folder / names.DATA_DIR)
    except UserError as exc:
        doc.warn(f"Grad-CAM skipped: the study's prepared data cannot be opened ({exc})")
        return None
    return _StudyImages(data, region_boxes(data), appendix_checks.region_names(data))


def _timed_backbone_appendix(doc, b, images: _StudyImages, settings: AppendixSettings):
    """One backbone's part, or a warning saying why it is skipped; its cost is logged."""
    from fer.core.errors import UserError

    if (
        not (b.folder / names.MODEL_FILE).is_file()
        or not (b.folder / names.TEST_PREDICTIONS_FILE).is_file()
    ):
        doc.warn(
            f"{b.name}: no {names.MODEL_FILE} or {names.TEST_PREDICTIONS_FILE} in its best folder; "
            "Grad-CAM skipped"
        )
        return None
    start, cpu = time.perf_counter(), time.process_time()
    try:
        row = _backbone_appendix(doc, b, images, settings)
    except UserError as exc:
        doc.warn(f"{b.name}: Grad-CAM skipped: {exc}")
        return None
    # read by benchmarks/report_speed.py (the appendix's cost per backbone)
    log.info(
        "gradcam appendix %s: %.2f s wall, %.2f s CPU",
        b.name,
        time.perf_counter() - start,
        time.process_time() - cpu,
    )
    return row


def _backbone_appendix(doc, b, images: _StudyImages, settings: AppendixSettings) -> dict | None:
    """Explain the selected test images, run the checks, then show warnings, heatmaps, mistakes
    and the checks' tables; returns the backbone's summary row (None when its predictions do not
    match the test split)."""
    from fer.explain.gradcam import GradCam
    from fer.explain.map_checks import readable_layer

    test = _open_test_set(doc, b, images.data)
    if test is None:
        return None
    selection = _select_rows(test, settings)
    rows = selection.rows
    explained = np.asarray(test.pixels[[test.index_of[test.pred.at[r, "path"]] for r in rows]])
    layer, cells = readable_layer(test.model)  # >= 7x7 cells where the backbone allows
    cam = GradCam(test.model, layer)
    panels = _Panels(
        test.pred,
        test.classes,
        explained,
        cam.explain(explained),
        {r: i for i, r in enumerate(rows)},
    )
    checks = appendix_checks.run_checks(
        test.model,
        cam,
        _check_sample(panels, selection.sample, images.named),
        test.classes,
        _validation_top_up(images.data, test.size, settings.n_faithfulness, len(selection.sample)),
    )
    doc.heading(
        f"{b.name} (target layer {layer}, {cells[0]}x{cells[1]} cells at {test.size} px)", 3
    )
    for text in appendix_checks.warnings(b.name, checks):  # above the heatmaps, not below
        doc.warn(text)
    _heatmap_grid(doc, b.name, panels, selection, settings.per_class)
    _mistakes(doc, b.name, panels, selection.mistakes)
    appendix_checks.render(doc, b.name, checks)
    row = {"backbone": b.name, "methods": appendix_checks.summary_rows(checks)}
    if images.regions:  # the study's data names its expression regions (the demo's regions file)
        row.update(region_heat(cam, test.pred, test.index_of, test.pixels, images.regions))
    return row


def _open_test_set(doc, b, data) -> _TestSet | None:
    """The best model and its test predictions; None (with a warning) when the predictions name
    images that are not in the study's test split."""
    from fer.evaluate.predict import load_model_and_classes

    model, classes, _ = load_model_and_classes(b.folder)
    pred = pd.read_csv(b.folder / names.TEST_PREDICTIONS_FILE)
    size = int(model.input_shape[1])
    index_of = {p: i for i, p in enumerate(data.paths("test"))}
    missing = [p for p in pred["path"] if p not in index_of]
    if missing:
        doc.warn(
            f"{b.name}: {len(missing)} test predictions do not match the study's test split "
            f"(e.g. {missing[0]}); Grad-CAM skipped"
        )
        return None
    return _TestSet(model, classes, pred, size, index_of, data.pixels("test", size))


def _select_rows(test: _TestSet, settings: AppendixSettings) -> _Selection:
    """The images shown per class, the mistakes shown, and a seeded random faithfulness sample."""
    pred = test.pred
    chosen, mistakes = _select(pred, test.classes, settings.per_class, settings.n_mistakes)
    rng = np.random.default_rng(0)
    sample = sorted(
        rng.choice(len(pred), size=min(settings.n_faithfulness, len(pred)), replace=False).tolist()
    )
    return _Selection(chosen, mistakes, sample)


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


def _check_sample(panels: _Panels, sample: list[int], named: dict) -> appendix_checks.Sample:
    """The faithfulness sample's images and maps, true classes and regions, for the checks."""
    from fer.explain.gradcam import Explanation

    idx = [panels.position[r] for r in sample]
    explanation = panels.explanation
    sub = Explanation(*(getattr(explanation, f.name)[idx] for f in dataclasses.fields(Explanation)))
    pred = panels.pred
    return appendix_checks.Sample(
        panels.images[idx],
        sub,
        pred.loc[sample, "label"].to_numpy(),
        [named.get(pred.at[r, "path"], {}) for r in sample] if named else None,
    )


def _validation_top_up(data, size: int, n_faithfulness: int, n_test: int):
    """Validation images that fill the faithfulness sample up to `n_faithfulness` when the test
    split is smaller (the checks select nothing, so they may use them), else None."""
    if n_faithfulness > n_test and len(data.labels("val")):
        return np.asarray(data.pixels("val", size)[: n_faithfulness - n_test])
    return None


def _caption(pred: pd.DataFrame, row: int, classes: list[str], explained: str) -> str:
    label, predicted = pred.at[row, "label"], pred.at[row, "predicted"]
    p = pred.at[row, f"p_{predicted}"]
    prefix = f"{label}: " if label == predicted else f"{label}→{predicted} "
    return f"{prefix}p={p:.2f}\n{explained}"


def _heatmap_grid(doc, name: str, panels: _Panels, selection: _Selection, per_class: int) -> None:
    """One row per true class: the most confident correct images left, incorrect ones right."""
    grid = [
        panels.slots(selection.chosen[c][0], per_class)
        + panels.slots(selection.chosen[c][1], per_class)
        for c in panels.classes
    ]
    column_titles = [
        f"correct #{k + 1}" if j == 0 else "" for k in range(per_class) for j in range(2)
    ] + [f"incorrect #{k + 1}" if j == 0 else "" for k in range(per_class) for j in range(2)]
    doc.figure(
        f"gradcam_{name}",
        figures.image_grid(grid, f"{name}: per class, correct vs incorrect", column_titles),
        f"{name}: Grad-CAM and Grad-CAM++ of the predicted class, one row per true class: the most "
        "confident correct (left) and incorrect (right) test images; empty where there are none",
    )


def _mistakes(doc, name: str, panels: _Panels, mistakes: list[int]) -> None:
    """The most confident mistakes: their Grad-CAM, and a table of them."""
    if not mistakes:
        doc.para(f"{name}: no mistakes on the test split.")
        return
    pred = panels.pred
    doc.figure(
        f"mistakes_{name}",
        figures.image_grid(
            [[p for r in mistakes for p in panels.of(r)[:1]]], f"{name}: most confident mistakes"
        ),
        f"{name}: the {len(mistakes)} most confident mistakes (Grad-CAM of the wrongly predicted "
        "class)",
    )
    table = pred.loc[mistakes, ["path", "label", "predicted"]].copy()
    table["confidence"] = [pred.at[r, f"p_{pred.at[r, 'predicted']}"] for r in mistakes]
    doc.table(table)


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


def _summary(doc, rows: list[dict]) -> None:
    """Every backbone's verdicts in one table, and heat per expression region where known."""
    doc.heading("Summary: faithfulness, sanity check, same-map test", 3)
    doc.para(
        "Per backbone and method: the verdict against random order (paired difference of the areas "
        "in brackets), the median rank correlation between different images' maps (same-map test) "
        "and with the fully randomised model's maps (sanity check); sample sizes in the 'images' "
        "column."
    )
    doc.table(pd.DataFrame([{"backbone": r["backbone"], **m} for r in rows for m in r["methods"]]))
    region_rows = [{k: v for k, v in r.items() if k != "methods"} for r in rows if len(r) > 2]
    if region_rows:
        doc.para(
            "This study's data comes with the regions that carry the expression "
            "(demo_regions.csv: mouth, eyes, brows). 'heat / area' is the share of Grad-CAM's heat "
            "inside them divided by their share of the image: 1 means heat spread evenly, above 1 "
            "heat on the expression."
        )
        doc.table(pd.DataFrame(region_rows))
