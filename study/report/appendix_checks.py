"""The Grad-CAM appendix's checks, per backbone: are these maps explanations? (statistics in
fer.explain.map_checks)

Computed before the heatmaps are drawn so that a method that does not beat random order (deletion or
insertion, paired over the same images), fails the model-randomisation sanity check, or gives nearly
the same map for every image gets its warning ABOVE the heatmaps. Then: the faithfulness table and
curves, the sanity-check curve, the mean Grad-CAM per class over correctly classified images (FER
faces are roughly aligned), and with a regions file (demo_regions.csv format, docs/results.md) the
heat per region and the pointing-game hit rate per class. Every number carries its sample size.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from study.report import figures

if TYPE_CHECKING:
    from fer.explain.gradcam import Explanation

METHODS = ("Grad-CAM", "Grad-CAM++")


@dataclasses.dataclass(frozen=True)
class Sample:
    """The faithfulness sample: test images, explained with the appendix's Grad-CAM."""

    images: np.ndarray
    explanation: Explanation  # of `images`, by the appendix's GradCam
    labels: np.ndarray  # their true classes (names)
    regions: list[dict] | None = None  # per image: region -> boxes (may be empty)


@dataclasses.dataclass(frozen=True)
class Checks:
    """What the checks found for one backbone (written out by `warnings`, `render` and
    `summary_rows`)."""

    layer: str
    cells: tuple[int, int]
    where: str  # which images the faithfulness numbers use
    faith_rows: list[dict]
    mean_curves: dict  # mode -> method -> (steps + 1,)
    similarity: dict  # method -> fer.explain.map_checks.map_similarity result
    sanity: dict  # fer.explain.map_checks.randomisation_check result
    class_means: dict  # class -> (overlay image, n)
    region_rows: list[dict]


def run_checks(
    model, cam, sample: Sample, classes: list[str], val_images=None, n_sanity: int = 64
) -> Checks:
    """All checks of one backbone's maps. `val_images`: validation images that top up the
    faithfulness sample (a small test split); `n_sanity`: images in the sanity check."""
    from fer.explain.map_checks import faithfulness_table, map_similarity

    curves, where = _faithfulness(model, cam, sample, val_images)
    sanity = _sanity_check(model, cam, sample, n_sanity)
    class_means = _class_means(sample, classes)
    region_rows = _region_rows(sample, classes)
    return Checks(
        layer=cam.layer_name,
        cells=tuple(cam.features.output.shape[1:3]),
        where=where,
        faith_rows=faithfulness_table(curves),
        mean_curves={
            mode: {k: c.mean(axis=0) for k, c in by.items()} for mode, by in curves.items()
        },
        similarity={m: map_similarity(v) for m, v in _maps(sample.explanation).items()},
        sanity=sanity,
        class_means=class_means,
        region_rows=region_rows,
    )


def _maps(explanation: Explanation) -> dict:
    return {"Grad-CAM": explanation.gradcam, "Grad-CAM++": explanation.gradcam_pp}


def _curves(model, images, explanation: Explanation, seed: int = 0) -> dict:
    """Deletion and insertion curves per image: mode -> method (and random order) -> curves."""
    from fer.explain.map_checks import faithfulness_curves

    maps = _maps(explanation)
    return faithfulness_curves(model, images, maps, explanation.class_ids, steps=8, seed=seed)


def _faithfulness(model, cam, sample: Sample, val_images) -> tuple[dict, str]:
    """The curves over the test sample, topped up with validation images (which select nothing)
    when given; and which images they are."""
    curves = _curves(model, sample.images, sample.explanation)
    where = f"{len(sample.images)} test images"
    if val_images is not None and len(val_images):
        more = _curves(model, val_images, cam.explain(val_images), seed=1000)
        curves = {
            mode: {k: np.concatenate([c, more[mode][k]]) for k, c in by.items()}
            for mode, by in curves.items()
        }
        where += f" and {len(val_images)} validation images"
    return curves, where


def _sanity_check(model, cam, sample: Sample, n_sanity: int) -> dict:
    """Model randomisation on the first `n_sanity` sample images."""
    from fer.explain.map_checks import gradcam_maps, randomisation_check

    k = min(n_sanity, len(sample.images))
    return randomisation_check(
        model,
        sample.images[:k],
        sample.explanation.class_ids[:k],
        gradcam_maps(cam.layer_name),
        n_backbone_steps=3,
    )


def _class_means(sample: Sample, classes: list[str]) -> dict:
    """class -> (its mean Grad-CAM over correctly classified images, drawn over their mean image;
    how many)."""
    from fer.explain.gradcam import overlay
    from fer.explain.map_checks import class_mean_maps

    explanation, labels = sample.explanation, sample.labels
    predicted = np.asarray(classes)[explanation.predicted]
    means = class_mean_maps(explanation.gradcam, labels, predicted, classes)
    class_means = {}
    for c, (heat, n) in means.items():
        keep = (np.asarray(labels) == c) & (predicted == c)
        class_means[c] = (
            overlay(
                sample.images[keep].mean(axis=0), heat / heat.max() if heat.max() > 0 else heat
            ),
            n,
        )
    return class_means


def _region_rows(sample: Sample, classes: list[str]) -> list[dict]:
    from fer.explain.map_checks import region_stats

    regions = sample.regions
    if not (regions and any(regions)):
        return []
    return region_stats(sample.explanation.gradcam, regions, sample.labels, classes)


def warnings(name: str, checks: Checks) -> list[str]:
    """One sentence per method that should not be read as an explanation, and why."""
    from fer.explain.map_checks import SAME_MAP_RHO, SANITY_RHO

    out = []
    verdicts = {(r["metric"], r["method"]): r for r in checks.faith_rows if r["method"] != "random"}
    for method in METHODS:
        why = []
        for mode in ("deletion", "insertion"):
            r = verdicts[(mode, method)]
            if r["vs random"] != "better":
                why.append(f"it is {_against(r['vs random'])} on {mode} (n = {r['images']} images)")
        sim = checks.similarity[method]
        if sim["same_map"]:
            why.append(
                "its maps are nearly the same for every image (median rank correlation between "
                f"different images' maps {sim['median_rho']:.2f} > {SAME_MAP_RHO}, n = "
                f"{sim['images']})"
            )
        rho = checks.sanity["median_rho"][method][-1]
        if checks.sanity["fails"][method]:
            why.append(
                "it fails the model-randomisation sanity check (median rank correlation "
                f"{rho:.2f} > {SANITY_RHO} with the fully randomised model's maps, n = "
                f"{checks.sanity['images']})"
            )
        if why:
            out.append(
                f"{name}: do not read the {method} maps below as explanations: "
                + "; ".join(why)
                + "."
            )
    return out


def _against(verdict: str) -> str:
    if verdict == "not distinguishable":
        return "not distinguishable from random order"
    return f"{verdict} than random order"


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def render(doc, name: str, checks: Checks) -> None:
    """The tables and figures of the checks, after the heatmaps."""
    _render_faithfulness(doc, name, checks)
    _render_sanity(doc, name, checks)
    _render_class_means(doc, name, checks)
    _render_regions(doc, name, checks)


def _render_faithfulness(doc, name: str, checks: Checks) -> None:
    """The deletion and insertion curves, their areas against random order, and whether the two
    agree."""
    from fer.explain.map_checks import BASELINE, disagreements

    doc.figure(
        f"deletion_{name}",
        figures.faithfulness_curves(checks.mean_curves, name),
        f"{name}: deletion (left, lower area = faster drop) and insertion (right, higher area = "
        f"faster rise) curves on {checks.where}; removed / not yet inserted pixels take {BASELINE}",
    )
    table = pd.DataFrame(
        [
            {
                "metric": r["metric"],
                "method": r["method"],
                "images": r["images"],
                "AUC [95% CI]": f"{_fmt(r['AUC'])} [{_fmt(r['AUC lo'])}, {_fmt(r['AUC hi'])}]",
                "minus random [paired 95% CI]": (
                    f"{r['minus random']:+.3f} [{r['diff lo']:+.3f}, {r['diff hi']:+.3f}]"
                    if "minus random" in r
                    else ""
                ),
                "vs random": r.get("vs random", ""),
            }
            for r in checks.faith_rows
        ]
    )
    doc.table(table)
    disagree = disagreements(checks.faith_rows)
    doc.para(
        f"{name}: deletion and insertion "
        + (
            "disagree: " + "; ".join(disagree) + "."
            if disagree
            else "agree on every method's verdict against random order."
        )
    )


def _render_sanity(doc, name: str, checks: Checks) -> None:
    """The model-randomisation curve, and each method's sanity and same-map numbers in words."""
    from fer.explain.map_checks import SANITY_RHO

    s = checks.sanity
    doc.figure(
        f"sanity_{name}",
        figures.sanity_curves(s["steps"], s["median_rho"], name),
        f"{name}: model-randomisation sanity check on {s['images']} test images: median Spearman "
        "rank correlation between the trained model's maps and those of the model with its head, "
        "then more and more backbone layers from the top re-drawn (kernels re-drawn, other weights "
        f"shuffled). Above {SANITY_RHO} at the end: the maps do not depend on what the model "
        "learned",
    )
    doc.para(
        f"{name}: "
        + "; ".join(
            f"{m} {'FAILS' if s['fails'][m] else 'passes'} the sanity check (median rank "
            f"correlation {s['median_rho'][m][-1]:.2f} with the fully randomised model, n = "
            f"{s['images']})"
            for m in METHODS
        )
        + "; "
        + "; ".join(
            f"{m} maps of different images correlate with median "
            f"{checks.similarity[m]['median_rho']:.2f} (n = {checks.similarity[m]['images']})"
            for m in METHODS
        )
        + "."
    )


def _render_class_means(doc, name: str, checks: Checks) -> None:
    if checks.class_means:
        doc.figure(
            f"class_means_{name}",
            figures.image_grid(
                [[(img, f"{c} (n={n})") for c, (img, n) in checks.class_means.items()]],
                f"{name}: mean Grad-CAM per class",
            ),
            f"{name}: where each expression is read: the mean Grad-CAM of the predicted class "
            "over the correctly classified images of each class among the "
            f"{checks.where.split(' and ')[0]} (n per panel), drawn over their mean image",
        )


def _render_regions(doc, name: str, checks: Checks) -> None:
    if checks.region_rows:
        doc.para(
            f"{name}: share of Grad-CAM's heat inside each expression region and the "
            "pointing-game hit rate (the hottest pixel inside any region), per true class, over "
            "the sample images that have regions:"
        )
        doc.table(pd.DataFrame(checks.region_rows).round(3))


def summary_rows(checks: Checks) -> list[dict]:
    """One row per method for the appendix's summary table (long format: fits the page)."""
    verdicts = {(r["metric"], r["method"]): r for r in checks.faith_rows}
    rows = []
    for m in METHODS:
        row = {
            "method": m,
            "target layer": f"{checks.layer} ({checks.cells[0]}x{checks.cells[1]})",
            "images": checks.where,
        }
        for mode in ("deletion", "insertion"):
            r = verdicts[(mode, m)]
            row[f"{mode} vs random"] = f"{r['vs random']} ({r['minus random']:+.3f})"
        row["same-map rho"] = (
            f"{checks.similarity[m]['median_rho']:.2f} (n={checks.similarity[m]['images']})"
        )
        row["sanity rho"] = (
            f"{checks.sanity['median_rho'][m][-1]:.2f} (n={checks.sanity['images']})"
        )
        rows.append(row)
    return rows


def region_names(sd) -> dict:
    """path -> {region: [boxes]} from DATA/demo_regions.csv (docs/results.md), or {} without one."""
    try:
        table = pd.read_csv(sd.source / "demo_regions.csv")
    except (OSError, ValueError):
        return {}
    if not {"path", "region", "x0", "y0", "x1", "y1"} <= set(table.columns):
        return {}
    out: dict = {}
    for (path, region), g in table.groupby(["path", "region"]):
        out.setdefault(path, {})[region] = list(
            g[["x0", "y0", "x1", "y1"]].itertuples(index=False, name=None)
        )
    return out
