"""The report's sections, in page order: header, data audit, comparison table (95% intervals),
per-backbone figures, search history, cross-dataset evaluations, failed or missing backbones (the
Grad-CAM appendix is in study.report.gradcam_appendix). Each writes blocks into a `Document`.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from fer.core import names
from study.report import figures
from study.report.deploy_columns import deployment_cells
from study.report.document import Document, format_cell, format_interval, format_number
from study.report.ensemble import ENSEMBLE_STATUS, ensemble_row
from study.report.load import StudyResults, trial_counts

MIN_TRIALS_FOR_IMPORTANCE = 4  # fANOVA on fewer completed trials says nothing
EDGE_FRACTION = 0.05  # a best value within 5% of its range's end is "at the edge"
SUMMARY_METRICS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"),
)
# the comparison's second table: what each best model cost to find and train
TRAINING_COLUMNS = [
    "params",
    "best hyperparameters",
    "trials",
    "stopped early",
    "errored",
    "train s",
    "images/s",
]


def audit_section(doc: Document, audit: dict | None) -> None:
    """What went into the numbers: files per class and split, what was excluded and why, and the
    leakage check."""
    doc.heading("Data audit")
    if not audit:
        doc.warn(
            f"no {names.DATA_DIR}/{names.AUDIT_FILE} in the study folder: the data behind these "
            "numbers was not audited"
        )
        return
    _audit_counts(doc, audit)
    _audit_totals(doc, audit)
    _audit_leakage(doc, audit)
    _audit_left_out(doc, audit)


def _audit_counts(doc: Document, audit: dict) -> None:
    """Files per class and split, with the class weights and a total row."""
    counts = audit.get("counts", {})
    splits = ("train", "val", "test", "excluded")
    rows = [
        {
            "class": c,
            **{s: counts[c].get(s, 0) for s in splits},
            "class weight": audit.get("class_weights", {}).get(c),
        }
        for c in counts
    ]
    if rows:
        total = {
            "class": "total",
            **{s: sum(r[s] for r in rows) for s in splits},
            "class weight": None,
        }
        doc.table(pd.DataFrame(rows + [total]))


def _audit_totals(doc: Document, audit: dict) -> None:
    t, d = audit.get("totals", {}), audit.get("duplicates", {})
    doc.para(
        f"{t.get('files', '?')} files: {t.get('quarantined', 0)} quarantined, "
        f"{audit.get('converted', 0)} converted (decoded from another mode or format), "
        f"{t.get('duplicate', 0)} excluded as duplicates ({d.get('exact_clusters', 0)} exact and "
        f"{d.get('near_clusters', 0)} near-duplicate clusters), "
        f"{len(audit.get('label_conflicts', []))} label conflicts, {audit.get('groups', '?')} "
        "groups (subjects or duplicate clusters) kept whole within one split."
    )


def _audit_leakage(doc: Document, audit: dict) -> None:
    leak = audit.get("leakage", {})
    if leak:
        text = (
            f"Leakage check: {leak.get('duplicate_pairs_across_splits', '?')} near-duplicate "
            f"pairs and {leak.get('groups_across_splits', '?')} groups across splits"
        )
        if leak.get("ok"):
            doc.para(text + ": OK.")
        else:
            doc.warn(text + ": FAILED, test scores may be optimistic.")


def _audit_left_out(doc: Document, audit: dict) -> None:
    """Folders that are not classes, classes left empty, and the quarantined files with why."""
    for key, what in (
        ("unknown_class_folders", "folders not used as classes"),
        ("empty_classes", "class folders without usable images (dropped)"),
    ):
        if audit.get(key):
            doc.warn(f"{what}: {', '.join(map(str, audit[key]))}")
    if audit.get("quarantined"):
        doc.para("Quarantined files (not used):")
        doc.table(pd.DataFrame(audit["quarantined"])[["path", "reason"]])


def _tuned_keys(study: StudyResults) -> list[str]:
    keys = list((study.space.get("space") or {}).keys())
    if not keys and study.trials is not None:  # no study.json: guess from the varying trial columns
        from fer.core.config import PARAMS

        keys = [
            k
            for k in PARAMS
            if k in study.trials and study.trials[k].nunique() > 1 and k != "backbone"
        ]
    return keys


def comparison_rows(study: StudyResults) -> list[dict]:
    """One row per backbone (failed and missing ones included, with their note): the comparison
    table."""
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
                    row[f"seed_{key}_mean"], row[f"seed_{key}_sd"] = (
                        stats.get("mean"),
                        stats.get("std"),
                    )
        row.update(trial_counts(b.trials))
        row["note"] = b.note
        rows.append(row)
    if study.ensemble is not None:
        params = [b.summary.get("params") for b in study.ok if b.name in study.ensemble.members]
        total = sum(params) if all(p is not None for p in params) else None
        rows.append(ensemble_row(study.ensemble, total, SUMMARY_METRICS))
    return rows


def comparison_section(doc: Document, study: StudyResults, rows: list[dict]) -> None:
    """The comparison in three tables (scores, training, deployment: each fits the page) and a
    chart of the scores with their intervals."""
    doc.heading("Comparison of backbones (test split)")
    metric = study.space.get("metric", "the validation metric")
    doc.para(
        f"Each backbone had its own hyperparameter search; the trial chosen by {metric} on the "
        "validation split was evaluated once on the test split. Brackets: 95% bootstrap intervals "
        "over test images. Overlapping intervals mean the test split cannot tell the backbones "
        "apart."
    )
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        doc.warn("no backbone has a tested best model: there is nothing to compare")
        return
    ensemble = [r for r in rows if r["status"] == ENSEMBLE_STATUS]
    if ensemble:
        doc.para(
            f"Last row, {ensemble[0]['backbone']}: the mean of the best models' softmax outputs "
            "on the test split (their stored test probabilities, equal weights; all best models, "
            "so it selects nothing on the test split); params is their sum."
        )
    shown = [_shown_line(r) for r in ok + ensemble]
    deployment = [
        {"backbone": r["backbone"], "params": line["params"], **deployment_cells(r)}
        for r, line in zip(ok, shown)
        if deployment_cells(r)
    ]
    frame = pd.DataFrame(shown, dtype=object)  # counts stay integers beside the ensemble's blanks
    doc.table(frame.drop(columns=TRAINING_COLUMNS))
    doc.table(frame[["backbone"] + TRAINING_COLUMNS])
    if deployment:
        doc.table(pd.DataFrame(deployment))
    doc.figure(
        "comparison",
        figures.comparison_chart(ok + ensemble),
        "Test accuracy and macro F1 with 95% intervals",
    )


def _shown_line(r: dict) -> dict:
    """One comparison row as shown: scores with intervals, seed spreads, F1 per class, then what
    the training cost."""
    line = {"backbone": r["backbone"]}
    for key, label in SUMMARY_METRICS:
        line[f"{label} [95% CI]"] = f"{r[key]:.3f} [{r[f'{key}_lo']:.3f}, {r[f'{key}_hi']:.3f}]"
    if r.get("seeds"):
        for key, label in SUMMARY_METRICS[:2]:
            if r.get(f"seed_{key}_mean") is not None:
                line[f"{label}, retrained with {r['seeds']} other seeds (mean ± sd)"] = (
                    f"{r[f'seed_{key}_mean']:.3f} ± {r[f'seed_{key}_sd']:.3f}"
                )
    line.update({k.removeprefix("f1_") + " F1": v for k, v in r.items() if k.startswith("f1_")})
    line["params"] = f"{r['params'] / 1e6:.2f} M" if r.get("params") else None
    line["best hyperparameters"] = ", ".join(
        f"{k.removeprefix('hp_')}={format_cell(v)}" for k, v in r.items() if k.startswith("hp_")
    )
    line.update(
        {
            "trials": r.get("trials"),
            "stopped early": r.get("stopped_early"),
            "errored": r.get("errored"),
            "train s": r.get("train_s"),
            "images/s": r.get("images_per_s"),
            "n test": r.get("n_test"),
        }
    )
    return line


def edge_warnings(study: StudyResults) -> list[str]:
    """A best value within EDGE_FRACTION of its searched range's end hints the optimum lies outside
    it."""
    out = []
    for b in study.ok:
        # its own ranges; fixed keys: not searched
        own = (study.space.get("per_backbone") or {}).get(b.name, {})
        for key, spec in (study.space.get("space") or {}).items():
            spec = own.get(key, spec)
            if not isinstance(spec, dict):
                continue
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
                searched = f"[{format_number(float(args[0]))}, {format_number(float(args[1]))}]"
                out.append(
                    f"{b.name}: the best {key} = {format_number(float(value))} sits at the {edge} "
                    f"edge of the searched range {searched}; the optimum may lie outside it, so "
                    "widen the range before trusting this comparison"
                )
    return out


def backbone_figures(doc: Document, study: StudyResults) -> None:
    for b in study.ok:
        doc.heading(f"{b.name}: errors and training", 3)
        classes = b.test.get("classes") or list(b.test.get("per_class", {}))
        doc.figure(
            f"confusion_{b.name}",
            figures.confusion_matrices(b.test["confusion_matrix"], classes, b.name),
            f"{b.name}: test confusion matrix, counts and row-normalised",
        )
        doc.figure(
            f"per_class_{b.name}",
            figures.per_class_bars(b.test["per_class"], b.name),
            f"{b.name}: test precision, recall and F1 per class",
        )
        if b.history is not None and not b.history.empty and "epoch" in b.history:
            doc.figure(
                f"learning_{b.name}",
                figures.learning_curves(b.history, b.name),
                f"{b.name}: learning curves of the best trial across both stages (dashed: start "
                "of fine-tuning)",
            )
        else:
            doc.para(f"{b.name}: no history.csv for the best trial, so no learning curves.")


@dataclasses.dataclass(frozen=True)
class _SearchStorage:
    """The study's Optuna storage, opened."""

    url: str
    study_names: list[str]


def search_section(doc: Document, study: StudyResults) -> None:
    """Per backbone: each trial's value and the best so far, and which hyperparameters mattered."""
    doc.heading("Hyperparameter search")
    storage = _open_search_storage(doc, study)
    if storage is None:
        return
    for b in study.backbones:
        _backbone_search(doc, study, b.name, storage)


def _open_search_storage(doc: Document, study: StudyResults) -> _SearchStorage | None:
    """The storage, or None with a paragraph or warning saying why there is no search history."""
    storage_path = study.folder / names.OPTUNA_FILE
    if not storage_path.is_file():
        doc.para(
            f"No Optuna storage ({names.OPTUNA_FILE}) in the study folder: search history not "
            "shown."
        )
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{storage_path.resolve()}"
    try:
        study_names = optuna.get_all_study_names(url)
    except Exception as exc:  # a damaged or foreign file
        doc.warn(f"could not read the Optuna storage: {type(exc).__name__}: {exc}")
        return None
    return _SearchStorage(url, study_names)


def _backbone_search(doc: Document, study: StudyResults, name: str, storage: _SearchStorage):
    """One backbone's search history figure and its importances."""
    import optuna

    own = names.optuna_study_name(study.space.get("name"), name)
    matches = [n for n in storage.study_names if n == own or n.endswith(f"-{name}")]
    if not matches:
        doc.para(f"{name}: no Optuna study in the storage.")
        return
    search = optuna.load_study(study_name=matches[0], storage=storage.url)
    done = [
        t for t in search.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE
    ]
    metric = study.space.get("metric", "objective")
    if not done:
        doc.para(f"{name}: no completed trial in the search.")
        return
    minimize = search.direction == optuna.study.StudyDirection.MINIMIZE
    doc.figure(
        f"search_{name}",
        figures.search_history(
            [t.number for t in done], [t.value for t in done], minimize, metric, name
        ),
        f"{name}: {metric} of each completed trial and the best so far",
    )
    _importances(doc, name, search, len(done))


def _importances(doc: Document, name: str, search, completed: int) -> None:
    """fANOVA importances (seeded), when enough trials completed for them to say anything."""
    import optuna

    if completed < MIN_TRIALS_FOR_IMPORTANCE:
        doc.para(
            f"{name}: hyperparameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} "
            f"completed trials ({completed} completed); skipped."
        )
        return
    try:
        values = optuna.importance.get_param_importances(
            search, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
    except Exception as exc:  # e.g. a parameter that never varied
        doc.para(f"{name}: importances could not be computed ({type(exc).__name__}: {exc}).")
        return
    if values:
        doc.figure(
            f"importance_{name}",
            figures.importances(values, name),
            f"{name}: hyperparameter importances (Optuna, fANOVA) over {completed} completed "
            "trials",
        )


def evaluations_section(doc: Document, study: StudyResults) -> None:
    if not study.evaluations:
        return
    doc.heading("Cross-dataset evaluation")
    doc.para(
        "Best models evaluated on other labelled datasets with `fer-study evaluate` "
        "(results/<study>/evaluations/)."
    )
    rows = []
    for e in study.evaluations:
        m = e["metrics"]
        rows.append(
            {
                "backbone": e.get("backbone")
                + (f" ({', '.join(e['members'])})" if e.get("members") else ""),
                "dataset": e.get("dataset"),
                "n": m.get("n"),
                **{f"{label} [95% CI]": format_interval(m[key]) for key, label in SUMMARY_METRICS},
                "skipped files": len(e.get("skipped_files", [])),
                "skipped folders": ", ".join(e.get("skipped_folders", [])),
            }
        )
    doc.table(pd.DataFrame(rows))
    skipped = [
        {"backbone": e.get("backbone"), "dataset": e.get("dataset"), **s}
        for e in study.evaluations
        for s in e.get("skipped_files", [])
    ]
    if skipped:
        doc.para("Files skipped during evaluation:")
        doc.table(pd.DataFrame(skipped))


def problems_section(doc: Document, study: StudyResults) -> None:
    bad = [b for b in study.backbones if b.status != "ok"]
    if not bad:
        return
    doc.heading("Failed or missing backbones")
    doc.para(
        "These backbones were part of the study but have no tested best model, so they are not in "
        "the comparison. The comparison is incomplete until they are rerun (`fer-study run ... "
        "--resume`)."
    )
    doc.table(
        pd.DataFrame([{"backbone": b.name, "status": b.status, "detail": b.note} for b in bad])
    )


def header_section(doc: Document, study: StudyResults) -> None:
    info = study.info
    facts = []
    if info.get("command"):
        command = info["command"]
        facts.append(f"Command: {' '.join(command) if isinstance(command, list) else command}")
    space = study.space
    if space:
        facts.append(
            f"Search: {space.get('trials_per_backbone', '?')} trials per backbone, selected by "
            f"{space.get('metric', '?')} ({space.get('mode', '?')}), space "
            f"'{space.get('name', '?')}'."
        )
    machine = info.get("machine") or info.get("hardware")
    if isinstance(machine, dict):
        facts.append(
            "Machine: "
            + ", ".join(f"{k}: {v}" for k, v in machine.items() if not isinstance(v, (dict, list)))
        )
        if isinstance(machine.get("packages"), dict):
            facts.append(
                "Versions: " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
            )
    for fact in facts:
        doc.para(fact)
    if info and info.get("status") not in (None, "completed"):
        doc.warn(
            f"the study's status is '{info.get('status')}': it is still running or was "
            "interrupted, so this report may be incomplete (finish it with `fer-study run ... "
            "--resume`)"
        )
