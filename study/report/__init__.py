"""`fer-study report`: from `results/<study>/` to `reports/<study>/` (report.html, report.md,
comparison.csv, figures/).

Reading the study folder is `load`, the document and its two renderings `document`, the opening
verdict `verdict`, the sections `sections` (the deployment view `deploy_columns`, the naive-split
section `naive`, the Grad-CAM appendix `gradcam_appendix` with its checks `appendix_checks`, the
charts `figures`).

Order of the page: the verdict (what to conclude, what to fix) before any table, the data audit (the
numbers depend on it), the comparison table with 95% intervals and the deployment view,
per-backbone figures, search history, cross-dataset evaluations, naive vs audited split, the
Grad-CAM appendix, and the backbones that failed or are missing.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fer.core import names
from study.report.deploy_columns import add_deployment_columns, deployment_section
from study.report.document import Document
from study.report.load import BackboneResult, StudyResults, load_study
from study.report.naive import naive_split_section
from study.report.sections import (
    audit_section,
    backbone_figures,
    comparison_rows,
    comparison_section,
    edge_warnings,
    evaluations_section,
    header_section,
    problems_section,
    search_section,
)
from study.report.verdict import add_verdict

__all__ = [
    "BackboneResult",
    "Document",
    "StudyResults",
    "build_report",
    "comparison_rows",
    "edge_warnings",
    "load_study",
]


def build_report(
    results: str | Path,
    out: str | Path | None = None,
    gradcam_per_class: int = 2,
    n_mistakes: int = 6,
    n_faithfulness: int = 128,
) -> Path:
    """Write report.html, report.md, comparison.csv and figures/ for a study folder; return the
    output folder."""
    study = load_study(Path(results))
    out_dir = Path(out) if out is not None else Path("reports") / study.name
    doc = Document(f"fer-study report: {study.name}")
    header_section(doc, study)
    add_verdict(doc, study, edge_warnings(study))  # before any table: what to conclude, what to fix
    audit_section(doc, study.audit)
    # written by prepare (fer/prepare/audit.py)
    sheet = study.folder / names.DATA_DIR / names.DUPLICATES_SHEET
    if study.audit and sheet.is_file():
        doc.figure(
            "duplicates_sheet",
            sheet.read_bytes(),
            "A random sample of excluded duplicate pairs and of "
            "label conflicts, with why each was matched (docs/duplicates.md)",
        )
    rows = comparison_rows(study)
    add_deployment_columns(rows, study)
    comparison_section(doc, study, rows)
    deployment_section(doc, rows)
    backbone_figures(doc, study)
    search_section(doc, study)
    evaluations_section(doc, study)
    naive_split_section(doc, study.folder)
    if gradcam_per_class > 0:
        from study.report.gradcam_appendix import gradcam_appendix

        gradcam_appendix(doc, study, gradcam_per_class, n_mistakes, n_faithfulness)
    problems_section(doc, study)

    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    for name, png in doc.figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    pd.DataFrame(rows).to_csv(out_dir / "comparison.csv", index=False)
    (out_dir / "report.md").write_text(doc.markdown() + "\n")
    (out_dir / "report.html").write_text(doc.html())
    return out_dir
