"""`fer-study report` on the shared smoke study: files, table rows, embedded figures, escaping,
rendering.

The report is built once per module (from a copy of the smoke study, to which a cross-dataset
evaluation is added whose data holds a file named with `<script>`), then inspected by several tests.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

EVIL_FILE = "<script>alert(1)<script>.png"  # a file name cannot hold "/"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def fer_study(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def _copy_study(src: Path, dst: Path) -> Path:
    shutil.copytree(
        src, dst, ignore=shutil.ignore_patterns("tune")
    )  # trials/: per-trial histories (verdict)
    return dst


@pytest.fixture(scope="module")
def report(smoke_study, demo_data_dir, tmp_path_factory):
    """(study copy, report folder) of a full report, with an evaluation on a folder holding
    EVIL_FILE."""
    from fer.evaluate.predict import evaluate_folder

    root = tmp_path_factory.mktemp("report")
    study = _copy_study(smoke_study, root / "results" / "smoke")
    backbone = next(
        p.name for p in sorted((study / "best").iterdir()) if (p / "model.keras").is_file()
    )
    classes = json.loads((study / "best" / backbone / "test_metrics.json").read_text())["classes"]
    other = root / "other-data"
    for cls in classes:
        (other / cls).mkdir(parents=True)
        for path in sorted((demo_data_dir / cls).glob("S0*"))[:2]:
            shutil.copy(path, other / cls / path.name)
    (other / classes[0] / EVIL_FILE).write_text("not an image")
    result = evaluate_folder(study / "best" / backbone, other, n_boot=100)
    (study / "evaluations").mkdir()
    (study / "evaluations" / f"{backbone}__other.json").write_text(json.dumps(result))
    out = root / "reports" / "smoke"
    proc = fer_study("report", study, "--out", out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return study, out


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def test_report_files_and_comparison_rows(report):
    study, out = report
    for name in ("report.html", "report.md", "comparison.csv"):
        assert (out / name).stat().st_size > 0
    space = json.loads((study / "study.json").read_text())["space"]
    table = pd.read_csv(out / "comparison.csv")
    backbones = table[table["status"] != "ensemble"]
    assert sorted(backbones["backbone"]) == sorted(
        space["backbones"]
    )  # one row per backbone of the study
    ok = table[table["status"] == "ok"]
    assert len(ok) >= 1
    # then the best models' softmax mean (tests/test_ensemble.py checks its numbers)
    ensemble = table[table["status"] == "ensemble"]
    assert list(ensemble["backbone"]) == ([f"ensemble of {len(ok)}"] if len(ok) > 1 else [])
    assert list(ensemble.index) == ([len(table) - 1] if len(ok) > 1 else [])  # the last row
    for key in ("accuracy", "macro_f1", "weighted_f1"):
        assert ((ok[f"{key}_lo"] <= ok[key]) & (ok[key] <= ok[f"{key}_hi"])).all()
    assert {"params", "trials", "stopped_early", "errored"} <= set(table.columns)
    assert any(c.startswith("hp_") for c in table.columns) and any(
        c.startswith("f1_") for c in table.columns
    )
    markdown = (out / "report.md").read_text()
    for _, row in ok.iterrows():  # counts shown as counts, also beside the ensemble's blanks
        counts = " | ".join(str(int(row[k])) for k in ("trials", "stopped_early", "errored"))
        counts = f"| {counts} |"
        assert counts in markdown, (counts, markdown)
    for section in (
        "Data audit",
        "Comparison of backbones",
        "Appendix: Grad-CAM",
        "Cross-dataset evaluation",
    ):
        assert section in markdown
    for backbone in ok["backbone"]:
        assert f"| {backbone} |" in markdown  # its row in the comparison table
        for figure in (f"confusion_{backbone}", f"gradcam_{backbone}", f"deletion_{backbone}"):
            assert (out / "figures" / f"{figure}.png").stat().st_size > 1000
            assert f"figures/{figure}.png" in markdown


def test_every_html_image_is_embedded(report):
    _, out = report
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    figures = sorted((out / "figures").glob("*.png"))
    assert len(parser.sources) == len(figures) >= 5
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "script" not in parser.tags and "link" not in parser.tags
    )  # nothing to fetch, nothing to run


def test_user_file_names_are_escaped(report):
    _, out = report
    page = (out / "report.html").read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;script&gt;.png" in page  # the skipped file is listed, escaped
    markdown = (out / "report.md").read_text()
    assert "<script" not in markdown and "&lt;script&gt;alert(1)&lt;script&gt;.png" in markdown


def test_missing_backbone_and_not_a_study(report, tmp_path):
    from study.report import build_report

    study, _ = report
    broken = _copy_study(study, tmp_path / "results" / "broken")
    gone = sorted(p.name for p in (broken / "best").iterdir())[-1]
    shutil.rmtree(broken / "best" / gone)
    out = build_report(broken, tmp_path / "out", gradcam_per_class=0)
    table = pd.read_csv(out / "comparison.csv")
    assert table.set_index("backbone").at[gone, "status"] in ("missing", "failed")
    markdown = (out / "report.md").read_text()
    assert "## Failed or missing backbones" in markdown and f"| {gone} |" in markdown

    proc = fer_study("report", tmp_path / "no-such-study")
    assert (
        proc.returncode == 2
        and "no such study folder" in proc.stderr
        and "Traceback" not in proc.stderr
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs it with apt-get)"
)
def test_report_renders_in_headless_chromium_without_broken_images(report):
    """Every <img> decoded (naturalWidth > 0), checked by the browser itself, offline."""
    _, out = report
    page = (out / "report.html").read_text()
    check = (
        "<script>window.addEventListener('load', () => {const imgs = [...document.images];"
        "const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;"
        "document.title = 'IMAGES ' + imgs.length + ' BROKEN ' + broken;});</script>"
    )
    probe = out.parent / "render_probe.html"
    probe.write_text(page.replace("</body>", check + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = len(_images_in(page))
    assert f"<title>IMAGES {images} BROKEN 0</title>" in proc.stdout, proc.stdout[:500]


def _images_in(page: str) -> list[str]:
    parser = _Images()
    parser.feed(page)
    return parser.sources


def test_edge_of_range_warnings():
    """A best value in the outer 5% of its searched range (log scale for loguniform) is flagged."""
    from study.report import BackboneResult, StudyResults, edge_warnings

    space = {
        "space": {
            "lr_head": {"loguniform": [1e-4, 1e-2]},
            "dropout": {"uniform": [0.2, 0.6]},
            "unfreeze_layers": {"int": [0, 100]},
            "dense_units": {"choice": [64, 128]},
        }
    }
    config = {"lr_head": 1.2e-4, "dropout": 0.41, "unfreeze_layers": 97, "dense_units": 64}
    study = StudyResults(
        Path("."),
        "s",
        {"space": space},
        None,
        None,
        [BackboneResult("resnet50", "ok", config=config, test={})],
        [],
    )
    warnings = edge_warnings(study)
    assert len(warnings) == 2
    assert "lr_head" in warnings[0] and "lower edge" in warnings[0]
    assert "unfreeze_layers" in warnings[1] and "upper edge" in warnings[1]


def test_edge_warnings_use_each_backbones_own_range():
    """per_backbone: a backbone's own range decides its edges; a key fixed for it is not
    searched."""
    from study.report import BackboneResult, StudyResults, edge_warnings

    space = {
        "space": {"lr_finetune": {"loguniform": [1e-5, 1e-2]}, "dropout": {"uniform": [0.2, 0.6]}},
        "per_backbone": {
            "mobilenetv2": {"lr_finetune": {"loguniform": [1e-5, 1e-4]}, "dropout": 0.21}
        },
    }
    config = {"lr_finetune": 9.5e-5, "dropout": 0.21}
    study = StudyResults(
        Path("."),
        "s",
        {"space": space},
        None,
        None,
        [
            BackboneResult("mobilenetv2", "ok", config=config, test={}),
            BackboneResult("smallcnn", "ok", config=config, test={}),
        ],
        [],
    )
    warnings = edge_warnings(study)
    assert len(warnings) == 2, warnings
    assert (
        warnings[0].startswith("mobilenetv2: the best lr_finetune") and "upper edge" in warnings[0]
    )
    assert warnings[1].startswith("smallcnn: the best dropout") and "lower edge" in warnings[1]


def test_report_opens_with_the_verdict(report):
    """The verdict comes before any table: ranking, a paired comparison for the pair of backbones,
    and the flags section's outcome; the comparison table wraps instead of running off the page."""
    study, out = report
    markdown = (out / "report.md").read_text()
    verdict_at, audit_at = markdown.index("## Verdict"), markdown.index("## Data audit")
    assert (
        verdict_at < audit_at and "\n| " not in markdown[:audit_at]
    )  # no table before the audit's
    verdict = markdown[verdict_at:audit_at]
    assert "Ranking by test accuracy" in verdict
    ok = [p.name for p in sorted((study / "best").iterdir()) if (p / "test_metrics.json").is_file()]
    if len(ok) == 2:
        assert f"{ok[0]} vs {ok[1]}" in verdict or f"{ok[1]} vs {ok[0]}" in verdict
        assert ("McNemar p = " in verdict or "McNemar p &lt; 0.001" in verdict) and (
            "indistinguishable on this test split" in verdict
            or "more accurate on this test split" in verdict
        )
    page = (out / "report.html").read_text()
    assert page.index("<h2>Verdict</h2>") < page.index("<table")


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs it with apt-get)"
)
def test_comparison_tables_fit_a_1280_px_page(report):
    """No table is wider than the page column (none cut at the right edge, none needing a
    scrollbar)."""
    _, out = report
    page = (out / "report.html").read_text()
    check = (
        "<script>window.addEventListener('load', () => {const wide = "
        "[...document.querySelectorAll('.scroll')].filter(d => d.scrollWidth > d.clientWidth + "
        "1).map(d => d.querySelector('th').textContent);document.title = 'TABLES ' + "
        "document.querySelectorAll('.scroll').length + ' WIDE ' + wide.join('/');});</script>"
    )
    probe = out.parent / "width_probe.html"
    probe.write_text(page.replace("</body>", check + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--window-size=1280,1000",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    title = proc.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    wide = title.split(" WIDE ", 1)[1].split("/") if " WIDE " in title else ["?"]
    assert title.startswith("TABLES ") and wide == [""], title
