"""The report's "Naive vs audited split" section: what `fer-study run --naive-split` measured, if it
ran.

It only shows `results/<study>/naive_split.json` (study/naive_split.py); nothing is computed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from fer.core.names import NAIVE_SPLIT_FILE


def _mean_sd(stats: dict | None, signed: bool = False) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:{'+' if signed else ''}.3f} ± {stats['sd']:.3f}"


def naive_split_section(doc, study_dir: Path) -> None:
    """One table: per backbone, test accuracy on the naive and the audited split (mean ± sd over
    split seeds), the paired gap, and how many test images share a subject or duplicate cluster with
    train."""
    path = Path(study_dir) / NAIVE_SPLIT_FILE
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    rows = []
    for backbone, stats in data.get("backbones", {}).items():
        rows.append(
            {
                "backbone": backbone,
                "naive split: test accuracy": _mean_sd(stats.get("naive")),
                "audited split: test accuracy": _mean_sd(stats.get("audited")),
                "gap naive - audited": _mean_sd(stats.get("gap"), signed=True),
                "seeds": (stats.get("gap") or {}).get("n", 0),
                "test images with their subject/duplicate in train (naive / audited)": " / ".join(
                    f"{(stats.get(k) or {}).get('test_groups_in_train', float('nan')):.0%}"
                    for k in ("naive", "audited")
                ),
            }
        )
    if not rows:
        return
    doc.heading("Naive vs audited split")
    doc.para(
        "Each backbone's selected configuration retrained on the split a notebook would make "
        "(random 70/15/15 over files: duplicates and subjects ignored) and on the audited split "
        f"(duplicates and subjects kept whole), over {data.get('seeds')} split seeds each (mean ± "
        "sd; the gap is paired by seed). The gap is how much a random split flatters the test "
        "accuracy (results/<study>/naive_split.json)."
    )
    doc.table(pd.DataFrame(rows))
