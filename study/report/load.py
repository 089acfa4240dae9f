"""Reading a study folder for the report: what each backbone left (tested best model, failed,
missing).

Missing or unreadable parts become notes, never errors, so a report of a half-finished study still
says what is there. File names and trial statuses are the writer's (fer.core.names), not guesses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import pandas as pd

from fer.core import names
from fer.core.errors import UserError

log = logging.getLogger(__name__)


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
    """What the study left for one backbone; `status` is ok (tested best model), failed or
    missing."""

    name: str
    status: str
    note: str = ""
    folder: Path | None = None
    config: dict = dataclasses.field(default_factory=dict)
    test: dict | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    history: pd.DataFrame | None = None
    trials: pd.DataFrame | None = None
    # best/<backbone>/seeds.json (final_seeds)
    seeds: dict = dataclasses.field(default_factory=dict)


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

    @functools.cached_property
    def ensemble(self):
        """The best models' softmax mean on the test split (study.report.ensemble.Ensemble), or
        None with fewer than two stored test probabilities; computed once per report."""
        from study.report.ensemble import build_ensemble

        return build_ensemble(self.ok)


def trial_counts(trials: pd.DataFrame | None) -> dict[str, int]:
    if trials is None or trials.empty or "status" not in trials:
        return {"trials": 0 if trials is None else len(trials), "stopped_early": 0, "errored": 0}
    status = trials["status"].astype(str)
    return {
        "trials": len(trials),
        "stopped_early": int((status == names.STOPPED).sum()),
        "errored": int((status == names.ERRORED).sum()),
    }


def _error_message(trials: pd.DataFrame | None) -> str:
    """The first errored trial's one-line error (trials.csv `error`)."""
    if trials is None or trials.empty or "error" not in trials or "status" not in trials:
        return ""
    errors = [
        str(v)
        for v in trials.loc[trials["status"].astype(str) == names.ERRORED, "error"].dropna()
        if str(v).strip()
    ]
    return errors[0] if errors else ""


def _selected_trial(folder: Path, trials: pd.DataFrame | None) -> dict:
    """The trials.csv row of the trial the study picked (best/<backbone>/selection.json), if
    recorded."""
    selection = _read_json(folder / names.SELECTION_FILE) or {}
    if trials is None or "trial_id" not in trials or "trial_id" not in selection:
        return {}
    match = trials[trials["trial_id"].astype(str) == str(selection["trial_id"])]
    return match.iloc[0].to_dict() if len(match) else {}


def _count_params(folder: Path) -> int | None:
    """Parameter count from model.keras, for trials stopped before they wrote summary.json."""
    if not (folder / names.MODEL_FILE).is_file():
        return None
    from fer.evaluate.predict import load_model_and_classes

    try:
        return int(load_model_and_classes(folder)[0].count_params())
    except UserError:
        return None


def load_study(results: Path) -> StudyResults:
    """Read everything the report needs; missing parts become notes, not errors."""
    results = Path(results)
    _check_study_folder(results)
    info = _read_json(results / names.STUDY_FILE) or {}
    trials = _read_csv(results / names.TRIALS_CSV)
    best_dir = results / names.BEST_DIR
    backbones = [
        _backbone_result(name, best_dir / name, _trials_of(trials, name))
        for name in _expected_backbones(info, trials, best_dir)
    ]
    return StudyResults(
        results,
        results.resolve().name,
        info,
        _read_json(results / names.DATA_DIR / names.AUDIT_FILE),
        trials,
        backbones,
        _evaluations(results),
    )


def _check_study_folder(results: Path) -> None:
    if not results.is_dir():
        raise UserError(f"no such study folder: {results}")
    if not names.has_study_results(results):
        raise UserError(
            f"{results} is not a study folder (no {names.STUDY_FILE} or {names.TRIALS_CSV}); "
            "run `fer-study run` first"
        )


def _expected_backbones(info: dict, trials: pd.DataFrame | None, best_dir: Path) -> list[str]:
    """The space's backbones, then any other that left trials or a best folder, so that none is
    silently left out of the report."""
    expected = list((info.get("space") or {}).get("backbones") or [])
    if trials is not None and "backbone" in trials:
        expected += [b for b in trials["backbone"].astype(str).unique() if b not in expected]
    if best_dir.is_dir():
        expected += [
            p.name
            for p in sorted(best_dir.iterdir())
            if p.is_dir() and p.name not in expected and not p.name.endswith(".partial")
        ]
    return expected


def _trials_of(trials: pd.DataFrame | None, name: str) -> pd.DataFrame | None:
    if trials is None or "backbone" not in trials:
        return None
    return trials[trials["backbone"].astype(str) == name]


def _backbone_result(name: str, folder: Path, own_trials: pd.DataFrame | None) -> BackboneResult:
    """ok with everything its best folder holds when the best model was tested, else failed or
    missing with why."""
    test = _read_json(folder / names.TEST_METRICS_FILE)
    if test is None:
        status, note = _why_untested(folder, own_trials)
        return BackboneResult(
            name, status, note, folder if folder.is_dir() else None, trials=own_trials
        )
    summary = {
        **_selected_trial(folder, own_trials),
        **(_read_json(folder / names.SUMMARY_FILE) or {}),
    }
    if summary.get("params") is None:
        summary["params"] = _count_params(folder)
    return BackboneResult(
        name,
        "ok",
        folder=folder,
        config=_read_json(folder / names.CONFIG_FILE) or {},
        test=test,
        summary=summary,
        history=_read_csv(folder / names.HISTORY_FILE),
        trials=own_trials,
        seeds=_read_json(folder / names.SEEDS_FILE) or {},
    )


def _why_untested(folder: Path, own_trials: pd.DataFrame | None) -> tuple[str, str]:
    """(status, note) of a backbone without test metrics: failed (every trial errored, or the best
    model was never evaluated) or missing."""
    counts = trial_counts(own_trials)
    if counts["trials"] and counts["errored"] == counts["trials"]:
        return "failed", f"all {counts['trials']} trials errored: {_error_message(own_trials)}"
    if folder.is_dir():
        return (
            "failed",
            f"the best model was not evaluated on the test split (no {names.TEST_METRICS_FILE})",
        )
    if counts["trials"]:
        return "missing", f"{counts['trials']} trials recorded, no best model"
    return "missing", "no trials and no best model in the results"


def _evaluations(results: Path) -> list[dict]:
    """`fer-study evaluate` results stored with the study (evaluations/*.json)."""
    return [
        e
        for e in (_read_json(p) for p in sorted((results / names.EVALUATIONS_DIR).glob("*.json")))
        if e and "metrics" in e
    ]
