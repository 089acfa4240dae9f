"""`fer-study report`: from `results/<study>/` to `reports/<study>/` (report.html, report.md, comparison.csv,
figures/).

The report is built as a list of blocks (headings, paragraphs, warnings, tables, figures) rendered twice:
to Markdown (figures linked from figures/) and to one self-contained HTML page (figures embedded as data
URIs, so it opens offline and can be mailed). Every text that can come from the user's data (file names,
class names, error messages) is escaped by the renderers, never by the callers.

Order of the page: the data audit first (the numbers depend on it), then the comparison table with 95%
intervals, per-backbone figures, search history, cross-dataset evaluations, the Grad-CAM appendix, and the
backbones that failed or are missing.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from fer.errors import UserError
from study import figures

log = logging.getLogger(__name__)

MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA on fewer completed trials says nothing
EDGE_FRACTION = 0.05  # a best value within 5% of its range's end is "at the edge"
SUMMARY_METRICS = (("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("weighted_f1", "weighted F1"))


# ---------------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("could not read %s: %s", path, exc)
        return None


def _read_csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        log.warning("could not read %s: %s", path, exc)
        return None


@dataclasses.dataclass
class BackboneResult:
    """What the study left for one backbone; `status` is ok (tested best model), failed or missing."""

    name: str
    status: str
    note: str = ""
    folder: Path | None = None
    config: dict = dataclasses.field(default_factory=dict)
    test: dict | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    history: pd.DataFrame | None = None
    trials: pd.DataFrame | None = None
    seeds: dict = dataclasses.field(default_factory=dict)  # best/<backbone>/seeds.json (final_seeds)


@dataclasses.dataclass
class StudyResults:
    folder: Path
    name: str
    info: dict
    audit: dict | None
    trials: pd.DataFrame | None
    backbones: list[BackboneResult]
    evaluations: list[dict]

    @property
    def space(self) -> dict:
        return self.info.get("space") or {}

    @property
    def ok(self) -> list[BackboneResult]:
        return [b for b in self.backbones if b.status == "ok"]


def _trial_counts(trials: pd.DataFrame | None) -> dict[str, int]:
    if trials is None or trials.empty or "status" not in trials:
        return {"trials": 0 if trials is None else len(trials), "stopped_early": 0, "errored": 0}
    status = trials["status"].astype(str).str.lower()
    return {"trials": len(trials), "stopped_early": int(status.str.contains("stop").sum()),
            "errored": int(status.str.contains("error|fail").sum())}


def _error_message(trials: pd.DataFrame | None) -> str:
    if trials is None or trials.empty:
        return ""
    for column in ("error", "message", "status"):
        if column in trials:
            values = [str(v) for v in trials[column].dropna() if str(v).strip()]
            errors = [v for v in values if column != "status" or "error" in v.lower()]
            if errors:
                return errors[0]
    return ""


def _selected_trial(folder: Path, trials: pd.DataFrame | None) -> dict:
    """The trials.csv row of the trial the study picked (best/<backbone>/selection.json), if recorded."""
    selection = _read_json(folder / "selection.json") or {}
    if trials is None or "trial_id" not in trials or "trial_id" not in selection:
        return {}
    match = trials[trials["trial_id"].astype(str) == str(selection["trial_id"])]
    return match.iloc[0].to_dict() if len(match) else {}


def _count_params(folder: Path) -> int | None:
    """Parameter count from model.keras, for trials stopped before they wrote summary.json."""
    if not (folder / "model.keras").is_file():
        return None
    from study.predict import load_model_and_classes

    try:
        return int(load_model_and_classes(folder)[0].count_params())
    except UserError:
        return None


def load_study(results: Path) -> StudyResults:
    """Read everything the report needs; missing parts become notes, not errors."""
    results = Path(results)
    if not results.is_dir():
        raise UserError(f"no such study folder: {results}")
    markers = [results / "study.json", results / "trials.csv", results / "best"]
    if not any(p.exists() for p in markers):
        raise UserError(f"{results} is not a study folder (no study.json, trials.csv or best/); "
                        "run `fer-study run` first")
    info = _read_json(results / "study.json") or {}
    trials = _read_csv(results / "trials.csv")
    expected = list((info.get("space") or {}).get("backbones") or [])
    if trials is not None and "backbone" in trials:
        expected += [b for b in trials["backbone"].astype(str).unique() if b not in expected]
    best_dir = results / "best"
    if best_dir.is_dir():
        expected += [p.name for p in sorted(best_dir.iterdir())
                     if p.is_dir() and p.name not in expected and not p.name.endswith(".partial")]
    backbones = []
    for name in expected:
        own_trials = trials[trials["backbone"].astype(str) == name] if trials is not None and "backbone" in trials \
            else None
        folder = best_dir / name
        test = _read_json(folder / "test_metrics.json")
        if test is None:
            counts = _trial_counts(own_trials)
            if counts["trials"] and counts["errored"] == counts["trials"]:
                status, note = "failed", f"all {counts['trials']} trials errored: {_error_message(own_trials)}"
            elif folder.is_dir():
                status, note = "failed", "the best model was not evaluated on the test split (no test_metrics.json)"
            else:
                status, note = "missing", (f"{counts['trials']} trials recorded, no best model" if counts["trials"]
                                           else "no trials and no best model in the results")
            backbones.append(BackboneResult(name, status, note, folder if folder.is_dir() else None,
                                            trials=own_trials))
            continue
        summary = {**_selected_trial(folder, own_trials), **(_read_json(folder / "summary.json") or {})}
        if summary.get("params") is None:
            summary["params"] = _count_params(folder)
        backbones.append(BackboneResult(
            name, "ok", folder=folder, config=_read_json(folder / "config.json") or {}, test=test,
            summary=summary, history=_read_csv(folder / "history.csv"), trials=own_trials,
            seeds=_read_json(folder / "seeds.json") or {}))
    evaluations = [e for e in (_read_json(p) for p in sorted((results / "evaluations").glob("*.json")))
                   if e and "metrics" in e]
    return StudyResults(results, results.resolve().name, info, _read_json(results / "data" / "audit.json"),
                        trials, backbones, evaluations)


# ------------------------------------------------------------------------------------------- the document
@dataclasses.dataclass
class Document:
    """Blocks rendered to both Markdown and HTML; figures kept as PNG bytes under a file-safe name."""

    title: str
    blocks: list[tuple] = dataclasses.field(default_factory=list)
    figures: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def warn(self, text: str) -> None:
        self.blocks.append(("warn", text))

    def table(self, frame: pd.DataFrame) -> None:
        self.blocks.append(("table", frame))

    def figure(self, name: str, png: bytes, caption: str) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.figures[name] = png
        self.blocks.append(("figure", name, caption))

    def markdown(self) -> str:
        out = [f"# {_md(self.title)}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * block[1] + " " + _md(block[2]), ""]
            elif kind == "para":
                out += [_md(block[1]), ""]
            elif kind == "warn":
                out += [f"> **Warning:** {_md(block[1])}", ""]
            elif kind == "table":
                frame = block[1]
                out.append("| " + " | ".join(_md(c) for c in frame.columns) + " |")
                out.append("|" + "---|" * len(frame.columns))
                out += ["| " + " | ".join(_md(_cell(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
                out.append("")
            elif kind == "figure":
                out += [f"![{_md(block[2])}](figures/{block[1]}.png)", "", f"*{_md(block[2])}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        esc = html.escape
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                level = min(block[1], 4)
                parts.append(f"<h{level}>{esc(block[2])}</h{level}>")
            elif kind == "para":
                parts.append(f"<p>{esc(block[1])}</p>")
            elif kind == "warn":
                parts.append(f'<p class="warn">&#9888; {esc(block[1])}</p>')
            elif kind == "table":
                frame = block[1]
                head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
                rows = "".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>"
                               for row in frame.itertuples(index=False))
                parts.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                             f"<tbody>{rows}</tbody></table></div>")
            elif kind == "figure":
                data = base64.b64encode(self.figures[block[1]]).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block[2])}">'
                             f"<figcaption>{esc(block[2])}</figcaption></figure>")
        return _HTML_PAGE.format(title=esc(self.title), body="\n".join(parts))


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }}
th {{ background: #f2f2f2; }}
.scroll {{ overflow-x: auto; }}
.warn {{ background: #fff4e0; border-left: 4px solid #e69500; padding: 0.4em 0.8em; }}
figure {{ margin: 0.5em 0 1.5em; }}
img {{ max-width: 100%; }}
figcaption {{ font-size: 0.85em; color: #555; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
</body></html>
"""


def _md(text) -> str:
    """Markdown-safe: HTML-escaped (viewers render raw HTML) and no table-breaking pipes or newlines."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, (float, np.floating)):
        return _num(value)
    return str(value)


def _num(value: float) -> str:
    value = float(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) >= 10 else f"{value:.3f}"


def _interval(metric: dict) -> str:
    lo, hi = metric["ci95"]
    return f"{metric['value']:.3f} [{lo:.3f}, {hi:.3f}]"


# ------------------------------------------------------------------------------------------- the sections
def _audit_section(doc: Document, audit: dict | None) -> None:
    doc.heading("Data audit")
    if not audit:
        doc.warn("no data/audit.json in the study folder: the data behind these numbers was not audited")
        return
    counts = audit.get("counts", {})
    splits = ("train", "val", "test", "excluded")
    rows = [{"class": c, **{s: counts[c].get(s, 0) for s in splits},
             "class weight": audit.get("class_weights", {}).get(c)} for c in counts]
    if rows:
        total = {"class": "total", **{s: sum(r[s] for r in rows) for s in splits}, "class weight": None}
        doc.table(pd.DataFrame(rows + [total]))
    t, d = audit.get("totals", {}), audit.get("duplicates", {})
    doc.para(f"{t.get('files', '?')} files: {t.get('quarantined', 0)} quarantined, {audit.get('converted', 0)} "
             f"converted (decoded from another mode or format), {t.get('duplicate', 0)} excluded as duplicates "
             f"({d.get('exact_clusters', 0)} exact and {d.get('near_clusters', 0)} near-duplicate clusters), "
             f"{len(audit.get('label_conflicts', []))} label conflicts, {audit.get('groups', '?')} groups "
             "(subjects or duplicate clusters) kept whole within one split.")
    leak = audit.get("leakage", {})
    if leak:
        text = (f"Leakage check: {leak.get('duplicate_pairs_across_splits', '?')} near-duplicate pairs and "
                f"{leak.get('groups_across_splits', '?')} groups across splits")
        if leak.get("ok"):
            doc.para(text + ": OK.")
        else:
            doc.warn(text + ": FAILED, test scores may be optimistic.")
    for key, what in (("unknown_class_folders", "folders not used as classes"),
                      ("empty_classes", "class folders without usable images (dropped)")):
        if audit.get(key):
            doc.warn(f"{what}: {', '.join(map(str, audit[key]))}")
    if audit.get("quarantined"):
        doc.para("Quarantined files (not used):")
        doc.table(pd.DataFrame(audit["quarantined"])[["path", "reason"]])


def _tuned_keys(study: StudyResults) -> list[str]:
    keys = list((study.space.get("space") or {}).keys())
    if not keys and study.trials is not None:  # no study.json: guess from the varying trial columns
        from fer.config import PARAMS

        keys = [k for k in PARAMS if k in study.trials and study.trials[k].nunique() > 1 and k != "backbone"]
    return keys


def comparison_rows(study: StudyResults) -> list[dict]:
    """One row per backbone (failed and missing ones included, with their note): the comparison table."""
    rows = []
    tuned = _tuned_keys(study)
    for b in study.backbones:
        row: dict = {"backbone": b.name, "status": b.status}
        if b.status == "ok":
            for key, _ in SUMMARY_METRICS:
                metric = b.test[key]
                row[key], (row[f"{key}_lo"], row[f"{key}_hi"]) = metric["value"], metric["ci95"]
            for cls, per in b.test.get("per_class", {}).items():
                row[f"f1_{cls}"] = per["f1"]
            row["n_test"] = b.test.get("n")
            row["params"] = b.summary.get("params")
            for key in tuned:
                row[f"hp_{key}"] = b.config.get(key)
            row["train_s"] = b.summary.get("train_s")
            row["images_per_s"] = b.summary.get("images_per_s")
            for key in ("accuracy", "macro_f1"):
                stats = b.seeds.get(f"test_{key}")
                if stats:
                    row["seeds"] = stats.get("n")
                    row[f"seed_{key}_mean"], row[f"seed_{key}_sd"] = stats.get("mean"), stats.get("std")
        row.update(_trial_counts(b.trials))
        row["note"] = b.note
        rows.append(row)
    return rows


def _comparison_section(doc: Document, study: StudyResults, rows: list[dict]) -> None:
    doc.heading("Comparison of backbones (test split)")
    metric = study.space.get("metric", "the validation metric")
    doc.para(f"Each backbone had its own hyperparameter search; the trial chosen by {metric} on the validation "
             "split was evaluated once on the test split. Brackets: 95% bootstrap intervals over test images. "
             "Overlapping intervals mean the test split cannot tell the backbones apart.")
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        doc.warn("no backbone has a tested best model: there is nothing to compare")
    else:
        shown = []
        for r in ok:
            line = {"backbone": r["backbone"]}
            for key, label in SUMMARY_METRICS:
                line[f"{label} [95% CI]"] = f"{r[key]:.3f} [{r[f'{key}_lo']:.3f}, {r[f'{key}_hi']:.3f}]"
            if r.get("seeds"):
                for key, label in SUMMARY_METRICS[:2]:
                    if r.get(f"seed_{key}_mean") is not None:
                        line[f"{label}, retrained with {r['seeds']} other seeds (mean ± sd)"] = (
                            f"{r[f'seed_{key}_mean']:.3f} ± {r[f'seed_{key}_sd']:.3f}")
            line.update({k.removeprefix("f1_") + " F1": v for k, v in r.items() if k.startswith("f1_")})
            line["params"] = f"{r['params'] / 1e6:.2f} M" if r.get("params") else None
            line["best hyperparameters"] = ", ".join(f"{k.removeprefix('hp_')}={_cell(v)}"
                                                     for k, v in r.items() if k.startswith("hp_"))
            line.update({"trials": r["trials"], "stopped early": r["stopped_early"], "errored": r["errored"],
                         "train s": r.get("train_s"), "images/s": r.get("images_per_s"), "n test": r.get("n_test")})
            shown.append(line)
        doc.table(pd.DataFrame(shown))
        doc.figure("comparison", figures.comparison_chart(ok), "Test accuracy and macro F1 with 95% intervals")
    for warning in edge_warnings(study):
        doc.warn(warning)


def edge_warnings(study: StudyResults) -> list[str]:
    """A best value within EDGE_FRACTION of its searched range's end hints the optimum lies outside it."""
    out = []
    for b in study.ok:
        for key, spec in (study.space.get("space") or {}).items():
            kind, args = next(iter(spec.items()))
            value = b.config.get(key)
            if kind == "choice" or value is None or len(args) != 2:
                continue
            lo, hi = float(args[0]), float(args[1])
            if kind == "loguniform":
                lo, hi, v = math.log(lo), math.log(hi), math.log(float(value))
            else:
                v = float(value)
            if hi <= lo:
                continue
            position = (v - lo) / (hi - lo)
            if position <= EDGE_FRACTION or position >= 1 - EDGE_FRACTION:
                edge = "lower" if position <= EDGE_FRACTION else "upper"
                out.append(f"{b.name}: the best {key} = {_num(float(value))} sits at the {edge} edge of the "
                           f"searched range [{_num(float(args[0]))}, {_num(float(args[1]))}]; the optimum may lie "
                           "outside it, so widen the range before trusting this comparison")
    return out


def _backbone_figures(doc: Document, study: StudyResults) -> None:
    for b in study.ok:
        doc.heading(f"{b.name}: errors and training", 3)
        classes = b.test.get("classes") or list(b.test.get("per_class", {}))
        doc.figure(f"confusion_{b.name}", figures.confusion_matrices(b.test["confusion_matrix"], classes, b.name),
                   f"{b.name}: test confusion matrix, counts and row-normalised")
        doc.figure(f"per_class_{b.name}", figures.per_class_bars(b.test["per_class"], b.name),
                   f"{b.name}: test precision, recall and F1 per class")
        if b.history is not None and not b.history.empty and "epoch" in b.history:
            doc.figure(f"learning_{b.name}", figures.learning_curves(b.history, b.name),
                       f"{b.name}: learning curves of the best trial across both stages (dashed: start of fine-tuning)")
        else:
            doc.para(f"{b.name}: no history.csv for the best trial, so no learning curves.")


def _search_section(doc: Document, study: StudyResults) -> None:
    doc.heading("Hyperparameter search")
    storage_path = study.folder / "optuna.sqlite3"
    if not storage_path.is_file():
        doc.para("No Optuna storage (optuna.sqlite3) in the study folder: search history not shown.")
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{storage_path.resolve()}"
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:  # a damaged or foreign file
        doc.warn(f"could not read the Optuna storage: {type(exc).__name__}: {exc}")
        return
    for b in study.backbones:
        matches = [n for n in names if n == f"{study.space.get('name')}-{b.name}" or n.endswith(f"-{b.name}")]
        if not matches:
            doc.para(f"{b.name}: no Optuna study in the storage.")
            continue
        search = optuna.load_study(study_name=matches[0], storage=storage)
        done = [t for t in search.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        metric = study.space.get("metric", "objective")
        if not done:
            doc.para(f"{b.name}: no completed trial in the search.")
            continue
        minimize = search.direction == optuna.study.StudyDirection.MINIMIZE
        doc.figure(f"search_{b.name}", figures.search_history([t.number for t in done], [t.value for t in done],
                                                              minimize, metric, b.name),
                   f"{b.name}: {metric} of each completed trial and the best so far")
        if len(done) < MIN_TRIALS_FOR_IMPORTANCE:
            doc.para(f"{b.name}: hyperparameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed "
                     f"trials ({len(done)} completed); skipped.")
            continue
        try:
            values = optuna.importance.get_param_importances(
                search, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except Exception as exc:  # e.g. a parameter that never varied
            doc.para(f"{b.name}: importances could not be computed ({type(exc).__name__}: {exc}).")
            continue
        if values:
            doc.figure(f"importance_{b.name}", figures.importances(values, b.name),
                       f"{b.name}: hyperparameter importances (Optuna, fANOVA) over {len(done)} completed trials")


def _evaluations_section(doc: Document, study: StudyResults) -> None:
    if not study.evaluations:
        return
    doc.heading("Cross-dataset evaluation")
    doc.para("Best models evaluated on other labelled datasets with `fer-study evaluate` "
             "(results/<study>/evaluations/).")
    rows = []
    for e in study.evaluations:
        m = e["metrics"]
        rows.append({"backbone": e.get("backbone"), "dataset": e.get("dataset"), "n": m.get("n"),
                     **{f"{label} [95% CI]": _interval(m[key]) for key, label in SUMMARY_METRICS},
                     "skipped files": len(e.get("skipped_files", [])),
                     "skipped folders": ", ".join(e.get("skipped_folders", []))})
    doc.table(pd.DataFrame(rows))
    skipped = [{"backbone": e.get("backbone"), "dataset": e.get("dataset"), **s}
               for e in study.evaluations for s in e.get("skipped_files", [])]
    if skipped:
        doc.para("Files skipped during evaluation:")
        doc.table(pd.DataFrame(skipped))


def _problems_section(doc: Document, study: StudyResults) -> None:
    bad = [b for b in study.backbones if b.status != "ok"]
    if not bad:
        return
    doc.heading("Failed or missing backbones")
    doc.para("These backbones were part of the study but have no tested best model, so they are not in the "
             "comparison. The comparison is incomplete until they are rerun (`fer-study run ... --resume`).")
    doc.table(pd.DataFrame([{"backbone": b.name, "status": b.status, "detail": b.note} for b in bad]))


def _header_section(doc: Document, study: StudyResults) -> None:
    info = study.info
    facts = []
    if info.get("command"):
        command = info["command"]
        facts.append(f"Command: {' '.join(command) if isinstance(command, list) else command}")
    space = study.space
    if space:
        facts.append(f"Search: {space.get('trials_per_backbone', '?')} trials per backbone, selected by "
                     f"{space.get('metric', '?')} ({space.get('mode', '?')}), space '{space.get('name', '?')}'.")
    machine = info.get("machine") or info.get("hardware")
    if isinstance(machine, dict):
        facts.append("Machine: " + ", ".join(f"{k}: {v}" for k, v in machine.items()
                                             if not isinstance(v, (dict, list))))
        if isinstance(machine.get("packages"), dict):
            facts.append("Versions: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items()))
    for fact in facts:
        doc.para(fact)
    if info and info.get("status") not in (None, "completed"):
        doc.warn(f"the study's status is '{info.get('status')}': it is still running or was interrupted, so "
                 "this report may be incomplete (finish it with `fer-study run ... --resume`)")


def build_report(results: str | Path, out: str | Path | None = None, gradcam_per_class: int = 2,
                 n_mistakes: int = 6, n_faithfulness: int = 16) -> Path:
    """Write report.html, report.md, comparison.csv and figures/ for a study folder; return the output folder."""
    study = load_study(Path(results))
    out_dir = Path(out) if out is not None else Path("reports") / study.name
    doc = Document(f"fer-study report: {study.name}")
    _header_section(doc, study)
    _audit_section(doc, study.audit)
    sheet = study.folder / "data" / "duplicates_sheet.png"  # written by prepare (fer/data/audit.py)
    if study.audit and sheet.is_file():
        doc.figure("duplicates_sheet", sheet.read_bytes(), "A random sample of excluded duplicate pairs and of "
                   "label conflicts, with why each was matched (docs/duplicates.md)")
    rows = comparison_rows(study)
    _comparison_section(doc, study, rows)
    _backbone_figures(doc, study)
    _search_section(doc, study)
    _evaluations_section(doc, study)
    if gradcam_per_class > 0:
        from study.report_gradcam import gradcam_appendix

        gradcam_appendix(doc, study, gradcam_per_class, n_mistakes, n_faithfulness)
    _problems_section(doc, study)

    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    for name, png in doc.figures.items():
        (fig_dir / f"{name}.png").write_bytes(png)
    pd.DataFrame(rows).to_csv(out_dir / "comparison.csv", index=False)
    (out_dir / "report.md").write_text(doc.markdown() + "\n")
    (out_dir / "report.html").write_text(doc.html())
    return out_dir
