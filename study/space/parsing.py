"""From the space file to a `Space`, section by section, in the order a reader meets them in the
file: what is compared (backbones, trials, selection metric), how trials are stopped (scheduler),
what is fixed, what is tuned, where the search starts, and each backbone's own settings.

The checks run in a fixed order and stop at the first problem, so one bad key gives one error naming
it. What must hold for every backbone once its own settings are merged is
study.space.backbone_checks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from fer.core.config import PARAMS, make_config
from fer.core.errors import UserError
from study.space.backbone_checks import check_each_backbone
from study.space.distributions import Dist, parse_dist
from study.space.keys import (
    METRICS,
    SCHEDULER_KEYS,
    SCHEDULERS,
    START_POINTS,
    TOP_KEYS,
    check_known,
    check_param_key,
    fail,
)
from study.space.search_space import Space

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_space(path: str | Path) -> Space:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raise UserError(f"{path}: the file is empty")
    return parse_space(raw, source=path.name)


def parse_space(raw: Any, source: str = "<space>") -> Space:
    """Validate a loaded YAML document into a `Space`; every error names the offending key."""
    _check_top_level(raw, source)
    metric, mode = _parse_selection(raw, source)
    backbones = _parse_backbones(raw["backbones"], source)
    trials = _whole_number(raw.get("trials_per_backbone", 1), 1, f"{source}: trials_per_backbone")
    final_seeds = _whole_number(raw.get("final_seeds", 0), 0, f"{source}: final_seeds")
    seed = _whole_number(raw.get("seed", 0), 0, f"{source}: seed")
    scheduler = _parse_scheduler(raw.get("scheduler"), source)
    fixed = _parse_fixed_section(raw.get("fixed") or {}, source)
    space = _parse_tuned(raw.get("space") or {}, fixed, source)
    start_points = _parse_points(
        raw.get("start_points") or [],
        space,
        f"{source}: start_points",
        fixed,
        "every key of 'space'",
    )
    _check_trial_budget(space, start_points, trials, source)
    per_backbone = _parse_per_backbone(
        raw.get("per_backbone"), backbones, space, f"{source}: per_backbone"
    )
    out = Space(
        name=str(raw.get("name") or Path(source).stem),
        metric=metric,
        mode=mode,
        backbones=tuple(backbones),
        trials_per_backbone=trials,
        scheduler=scheduler,
        fixed=fixed,
        space=space,
        start_points=start_points,
        final_seeds=final_seeds,
        seed=seed,
        source=source,
        per_backbone=per_backbone,
    )
    check_each_backbone(out, source)
    return out


# ------------------------------------------------------------------- what is compared, and how


def _check_top_level(raw: Any, source: str) -> None:
    """A mapping of known keys, with the two a study cannot do without."""
    check_known(raw, TOP_KEYS, source)
    for required in ("backbones", "trials_per_backbone"):
        if required not in raw:
            raise fail(source, f"missing required key '{required}'")


def _parse_selection(raw: dict, source: str) -> tuple[str, str]:
    """The metric the best trial is selected by, and its direction (min for losses by default)."""
    metric = raw.get("metric", "val_loss")
    if metric not in METRICS:
        raise fail(f"{source}: metric", f"unknown metric '{metric}' (known: {', '.join(METRICS)})")
    mode = raw.get("mode", "min" if metric.endswith("loss") else "max")
    if mode not in ("min", "max"):
        raise fail(f"{source}: mode", f"'{mode}' is not min or max")
    return metric, mode


def _parse_backbones(backbones: Any, source: str) -> list[str]:
    """Known backbone names, each once (one name alone is a list of one)."""
    from fer.model.backbones import BACKBONES

    if isinstance(backbones, str):
        backbones = [backbones]
    if not isinstance(backbones, list) or not backbones:
        raise fail(f"{source}: backbones", "expected a non-empty list of backbone names")
    for backbone in backbones:
        if backbone not in BACKBONES:
            raise fail(
                f"{source}: backbones",
                f"unknown backbone '{backbone}' (known: {', '.join(BACKBONES)})",
            )
    if len(set(backbones)) != len(backbones):
        raise fail(f"{source}: backbones", "a backbone is listed twice")
    return backbones


def _whole_number(value: Any, minimum: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise fail(where, f"expected a whole number >= {minimum}, got {value!r}")
    return value


def _parse_scheduler(scheduler: Any, source: str) -> dict:
    """`none` (every trial runs to the end) or `asha` with its grace period and reduction factor."""
    scheduler = scheduler or {"type": "none"}
    if isinstance(scheduler, str):
        scheduler = {"type": scheduler}
    check_known(scheduler, SCHEDULER_KEYS, f"{source}: scheduler")
    scheduler = dict(scheduler)
    scheduler.setdefault("type", "asha")
    if scheduler["type"] not in SCHEDULERS:
        raise fail(
            f"{source}: scheduler.type",
            f"unknown scheduler '{scheduler['type']}' (known: {', '.join(SCHEDULERS)})",
        )
    if scheduler["type"] == "asha":
        for key, default, minimum in (("grace_period", 1, 1), ("reduction_factor", 3, 2)):
            value = scheduler.setdefault(key, default)
            _whole_number(value, minimum, f"{source}: scheduler.{key}")
    return scheduler


# ------------------------------------------------------------------------ fixed and tuned keys


def _parse_fixed_section(fixed_raw: Any, source: str) -> dict:
    check_known(fixed_raw, tuple(PARAMS), f"{source}: fixed")
    return _parse_fixed(fixed_raw, f"{source}: fixed")


def _parse_fixed(values: dict, where: str) -> dict:
    """Fixed config values, coerced; `${VAR}` expanded; a weights file must exist (made absolute,
    since Ray workers run elsewhere)."""
    expanded = {}
    for key, value in values.items():
        check_param_key(key, where)
        expanded[key] = _expand_env(value, f"{where}.{key}")
    try:
        coerced = make_config(expanded)
    except UserError as exc:
        raise fail(where, str(exc)) from None
    out = {key: coerced[key] for key in expanded}
    if out.get("weights") not in (None, "imagenet", "none"):
        path = Path(out["weights"]).expanduser()
        if not path.is_file():
            raise fail(
                f"{where}.weights",
                f"weights file not found: {path} "
                f"(relative paths start from the current directory {Path.cwd()})",
            )
        out["weights"] = str(path.resolve())
    return out


def _expand_env(value: Any, where: str) -> Any:
    """`${NAME}` / `${NAME:-default}` in a text value -> the environment variable NAME (or the
    default)."""
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if os.environ.get(name):
            return os.environ[name]
        if default is not None:
            return default
        raise fail(
            where,
            f"environment variable {name} is not set "
            f"(used in {value!r}; set it, or write ${{{name}:-default}})",
        )

    return _ENV_VAR.sub(substitute, value)


def _parse_tuned(space_raw: Any, fixed: dict, source: str) -> dict:
    """`space`: config key -> distribution; a key is either fixed or tuned, never both."""
    if not isinstance(space_raw, dict):
        raise fail(f"{source}: space", "expected a mapping of config key -> distribution")
    space = {}
    for key, spec in space_raw.items():
        check_param_key(key, f"{source}: space")
        if key in fixed:
            raise fail(f"{source}: space", f"'{key}' is both fixed and tuned")
        space[key] = parse_dist(key, spec, f"{source}: space")
    return space


# ---------------------------------------------------------------------------------- start points


def _parse_points(points: Any, tuned: dict, where: str, fixed: dict, scope: str) -> tuple:
    """Start points: each sets every key of `tuned` (named by `scope` in the error), coerced in the
    context of `fixed`, and lies inside its distribution."""
    if not isinstance(points, list):
        raise fail(where, "expected a list of mappings")
    out = []
    for i, point in enumerate(points):
        here = f"{where}[{i}]"
        check_known(point, tuple(tuned), here)
        missing = [key for key in tuned if key not in point]
        if missing:
            raise fail(here, f"missing tuned key '{missing[0]}' (a start point sets {scope})")
        try:
            coerced = make_config({**fixed, **point})
        except UserError as exc:
            raise fail(here, str(exc)) from None
        point = {key: coerced[key] for key in tuned}
        for key, value in point.items():
            if not tuned[key].contains(value):
                raise fail(
                    here, f"'{key}': {value!r} lies outside its distribution {tuned[key].as_dict()}"
                )
        out.append(point)
    return tuple(out)


def _check_trial_budget(space: dict, start_points: tuple, trials: int, source: str) -> None:
    """Several trials need something to tune, and the start points fit in the trials."""
    if not space and trials > 1:
        raise fail(
            f"{source}: trials_per_backbone",
            f"{trials} trials but nothing to tune ('space' is empty)",
        )
    if len(start_points) > trials:
        raise fail(
            f"{source}: start_points",
            f"{len(start_points)} start points exceed trials_per_backbone={trials}",
        )


# --------------------------------------------------------------------------- per-backbone settings


def _parse_per_backbone(raw: Any, backbones: list, space: dict, where: str) -> dict:
    """`per_backbone: {backbone: {key: value or distribution}}` -> {backbone: {key: value or
    Dist}}."""
    from fer.model.backbones import BACKBONES

    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise fail(where, "expected a mapping backbone -> {config key: value or distribution}")
    out = {}
    for backbone, settings in raw.items():
        if backbone not in BACKBONES:
            raise fail(where, f"unknown backbone '{backbone}' (known: {', '.join(BACKBONES)})")
        if backbone not in backbones:
            raise fail(
                where, f"'{backbone}' is not one of the study's backbones ({', '.join(backbones)})"
            )
        out[backbone] = _parse_own_settings(settings, space, f"{where}.{backbone}")
    return out


def _parse_own_settings(settings: Any, space: dict, here: str) -> dict:
    """One backbone's settings: plain values fix a key for it (over `fixed`, or instead of tuning
    it); a distribution gives a key tuned in `space` this backbone's own range; `start_points`
    replace the shared ones for it."""
    if not isinstance(settings, dict) or not settings:
        raise fail(
            here, f"expected a mapping of config key -> value or distribution, got {settings!r}"
        )
    points = settings.get(START_POINTS)
    settings = {k: v for k, v in settings.items() if k != START_POINTS}
    own = _parse_fixed({k: v for k, v in settings.items() if not isinstance(v, dict)}, here)
    for key, spec in settings.items():
        if isinstance(spec, dict):
            check_param_key(key, here)
            if key not in space:
                raise fail(
                    f"{here}.{key}",
                    f"'{key}' is not tuned in 'space' (a distribution here only "
                    "gives a tuned key this backbone's own range); give a plain value",
                )
            own[key] = parse_dist(key, spec, here)
    if points is not None:
        own[START_POINTS] = _parse_own_points(points, own, space, f"{here}.{START_POINTS}")
    return own


def _parse_own_points(points: Any, own: dict, space: dict, where: str) -> tuple:
    """A backbone's own start points: each sets every key it tunes (they replace the shared ones for
    it)."""
    tuned = {
        k: own.get(k, dist) for k, dist in space.items() if k not in own or isinstance(own[k], Dist)
    }
    return _parse_points(points, tuned, where, {}, "every key this backbone tunes")
