"""Search-space YAML: loading and validation (format: docs/commands.md, "Search space YAML").

A space file says which backbones to compare, how many trials each one gets, which trial-config keys
are fixed and which are tuned (with their distributions), the points evaluated first, the selection
metric and the early-stopping scheduler. Everything is checked here, before Ray starts, so a typo
costs a one-line `UserError` naming the key rather than a crashed study an hour later.

Distributions (one key each): `uniform: [lo, hi]`, `loguniform: [lo, hi]` (lo > 0), `int: [lo, hi]`
(inclusive), `choice: [a, b, ...]`. Ranges must lie inside the key's allowed range
(fer.core.config.PARAMS).

Per-backbone settings (`per_backbone: {backbone: {key: value}}`): a comparison of backbones often
needs each one's own weights file, image size or learning-rate range. A plain value fixes the key
for that backbone (over `fixed`, or instead of tuning it); a distribution gives a key tuned in
`space` that backbone's own range. Start points are given once, over `space` (for each backbone they
keep only the keys it tunes), or per backbone (`per_backbone.<backbone>.start_points`, over every
key it tunes) where its ranges differ.

Paths: `${NAME}` and `${NAME:-default}` in a fixed value are replaced by the environment variable
NAME (for example `weights: ${FER_SHARED}/weights/x.h5` or `${WEIGHTS:-weights}/x.h5`); a relative
weights path is relative to the current directory and made absolute at load time, since Ray workers
run elsewhere. A fixed weights file must exist when the space is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from fer.core.config import PARAMS, check_rules, coerce, default_config, make_config
from fer.core.errors import UserError

METRICS = ("val_loss", "val_accuracy", "val_macro_f1", "loss", "accuracy")
"""Per-epoch values a space may select the best trial by (docs/results.md, the per-epoch record)."""

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SCHEDULERS = ("asha", "none")
TOP_KEYS = (
    "name",
    "metric",
    "mode",
    "backbones",
    "trials_per_backbone",
    "scheduler",
    "fixed",
    "space",
    "start_points",
    "final_seeds",
    "seed",
    "description",
    "per_backbone",
)
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor")
START_POINTS = "start_points"  # inside per_backbone.<backbone>: that backbone's own start points
UNTUNABLE = ("backbone",)  # the backbone is the question, never a nuisance parameter


@dataclasses.dataclass(frozen=True)
class Dist:
    """One tuned key's distribution."""

    kind: str
    args: tuple

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.args
        lo, hi = self.args
        return isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi

    def as_dict(self) -> dict:
        return {self.kind: list(self.args)}


@dataclasses.dataclass(frozen=True)
class Space:
    """A validated search space. `fixed` and `start_points` hold coerced config values."""

    name: str
    metric: str
    mode: str
    backbones: tuple[str, ...]
    trials_per_backbone: int
    scheduler: dict
    fixed: dict
    space: dict  # key -> Dist
    start_points: tuple  # of dicts over exactly the tuned keys
    final_seeds: int = 0
    seed: int = 0
    source: str = ""

    # backbone -> {key: value (fixed for it) or Dist (its own range of a key tuned in `space`)}
    per_backbone: dict = dataclasses.field(default_factory=dict)

    def fixed_for(self, backbone: str) -> dict:
        """The keys fixed for `backbone`: `fixed` updated by its per-backbone values."""
        own = self.per_backbone.get(backbone, {})
        return {
            **self.fixed,
            **{k: v for k, v in own.items() if k != START_POINTS and not isinstance(v, Dist)},
        }

    def space_for(self, backbone: str) -> dict:
        """The keys tuned for `backbone` and their distributions (its own range where it has one)."""
        own = self.per_backbone.get(backbone, {})
        return {
            k: own.get(k, dist)
            for k, dist in self.space.items()  # a key fixed for it is not tuned
            if k not in own or isinstance(own[k], Dist)
        }

    def start_points_for(self, backbone: str) -> tuple:
        """The start points over the keys `backbone` tunes: its own (per_backbone start_points) if
        given."""
        own = self.per_backbone.get(backbone, {})
        if START_POINTS in own:
            return tuple(dict(p) for p in own[START_POINTS])
        keys = self.space_for(backbone)
        return tuple({k: v for k, v in point.items() if k in keys} for point in self.start_points)

    def config_for(self, backbone: str, params: dict) -> dict:
        """The full trial config for `backbone` with tuned `params` (every key: trials.csv shows
        them all).

        Not validated here: loading the space checked every range, and the trial validates its
        config once (`fer.train.trial.run_trial`).

        With `finetune_features: cached` and `finetune_cache_units` left unset, every trial cuts the
        network at the largest `unfreeze_layers` the backbone's space allows, so all trials of a
        backbone share one stage-2 cache."""
        config = {**self.fixed_for(backbone), **params, "backbone": backbone}
        if config.get("finetune_features") == "cached" and "finetune_cache_units" not in config:
            config["finetune_cache_units"] = self.largest("unfreeze_layers", backbone)
        return {**default_config(), **config}

    def largest(self, key: str, backbone: str):
        """The largest value `key` takes for `backbone` in this space (tuned or fixed)."""
        space = self.space_for(backbone)
        if key in space:
            dist = space[key]
            return max(dist.args) if dist.kind == "choice" else dist.args[1]
        return self.fixed_for(backbone).get(key, PARAMS[key].default)

    def max_epochs(self, backbone: str | None = None) -> int:
        """The most epochs a trial of `backbone` (default: of any backbone) can run, for the
        scheduler's max_t."""
        if backbone is None:
            return max(self.max_epochs(b) for b in self.backbones)
        return int(self.largest("epochs_head", backbone)) + int(
            self.largest("epochs_finetune", backbone)
        )

    def warnings(self) -> list[str]:
        """Settings that are valid but likely to mislead, one sentence each (`run` prints them at
        start).

        ASHA's first rung inside a backbone's head stage: in README's FER2013 reference study, 5 of
        the 10 trials of the two ImageNet backbones were stopped at epoch 4 on head-only accuracy (6
        head epochs), which says little about how a trial fine-tunes."""
        if self.scheduler.get("type") != "asha":
            return []
        grace = int(self.scheduler["grace_period"])
        heads = {b: int(self.largest("epochs_head", b)) for b in self.backbones}
        inside = [
            b
            for b, head in heads.items()
            if grace <= head and int(self.largest("epochs_finetune", b)) > 0
        ]
        if not inside:
            return []
        named = ", ".join(f"{b} ({heads[b]})" for b in inside)
        return [
            f"ASHA's first rung (epoch {grace}) falls in the head stage of {named} (head epochs in brackets): "
            "trials are stopped on head-only accuracy before any fine-tuning; set scheduler.grace_period above "
            "the head epochs (or fewer head epochs) to compare fine-tuned trials"
        ]

    def image_sizes(self, backbone: str) -> list[int]:
        """The image sizes a trial of `backbone` may use (empty when image_size is tuned over a
        range)."""
        dist = self.space_for(backbone).get("image_size")
        if dist is None:
            return [int(self.fixed_for(backbone).get("image_size", PARAMS["image_size"].default))]
        return sorted(int(v) for v in dist.args) if dist.kind == "choice" else []

    def to_dict(self) -> dict:
        """The space as plain data (for study.json); loading this back gives the same Space."""
        out = {
            "name": self.name,
            "metric": self.metric,
            "mode": self.mode,
            "backbones": list(self.backbones),
            "trials_per_backbone": self.trials_per_backbone,
            "scheduler": dict(self.scheduler),
            "fixed": dict(self.fixed),
            "space": {k: d.as_dict() for k, d in self.space.items()},
            "start_points": [dict(p) for p in self.start_points],
            "final_seeds": self.final_seeds,
            "seed": self.seed,
        }
        if (
            self.per_backbone
        ):  # only when used: study.json of earlier studies stays comparable on --resume
            out["per_backbone"] = {
                b: {
                    k: v.as_dict()
                    if isinstance(v, Dist)
                    else [dict(p) for p in v]
                    if k == START_POINTS
                    else v
                    for k, v in own.items()
                }
                for b, own in self.per_backbone.items()
            }
        return out


def _fail(where: str, message: str) -> UserError:
    return UserError(f"{where}: {message}")


def _check_known(mapping: Any, allowed: tuple, where: str) -> dict:
    if not isinstance(mapping, dict):
        raise _fail(where, f"expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise _fail(where, f"unknown key '{key}' (allowed: {', '.join(allowed)})")
    return mapping


def _check_param_key(key: Any, where: str) -> None:
    if key not in PARAMS:
        raise _fail(where, f"unknown config key '{key}' (known: {', '.join(PARAMS)})")
    if key in UNTUNABLE:
        raise _fail(where, f"'{key}' is set by 'backbones:', not here")


def _parse_dist(key: str, spec: Any, where: str) -> Dist:
    where = f"{where}.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(
            where, f"expected one of {', '.join(DISTRIBUTIONS)} with its arguments, got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise _fail(where, f"unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
    param = PARAMS[key]
    if not isinstance(args, list) or not args:
        raise _fail(where, f"'{kind}' needs a list of values, got {args!r}")
    if kind == "choice":
        values = []
        for value in args:
            try:
                values.append(coerce(key, value))
            except UserError as exc:
                raise _fail(where, str(exc)) from None
        if len(set(values)) != len(values):
            raise _fail(where, f"duplicate choices in {args!r}")
        return Dist("choice", tuple(values))
    if param.type is str:
        raise _fail(where, f"'{key}' takes text values: use 'choice', not '{kind}'")
    if kind == "int" and param.type is not int:
        raise _fail(where, f"'{key}' is a float: use 'uniform' or 'loguniform', not 'int'")
    if kind in ("uniform", "loguniform") and param.type is int:
        raise _fail(where, f"'{key}' is an integer: use 'int' or 'choice', not '{kind}'")
    if len(args) != 2 or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
    ):
        raise _fail(where, f"'{kind}' needs [low, high] numbers, got {args!r}")
    lo, hi = args
    if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise _fail(where, f"'int' needs whole-number bounds, got {args!r}")
    if not lo < hi:
        raise _fail(where, f"bad range [{lo}, {hi}]: low must be below high")
    if kind == "loguniform" and lo <= 0:
        raise _fail(where, f"bad range [{lo}, {hi}]: loguniform needs low > 0")
    if param.low is not None and (lo < param.low or hi > param.high):
        raise _fail(
            where, f"bad range [{lo}, {hi}]: '{key}' must stay within [{param.low}, {param.high}]"
        )
    if kind == "int":
        return Dist("int", (int(lo), int(hi)))
    return Dist(kind, (float(lo), float(hi)))


def parse_space(raw: Any, source: str = "<space>") -> Space:
    """Validate a loaded YAML document into a `Space`; every error names the offending key."""
    from fer.model.backbones import BACKBONES

    _check_known(raw, TOP_KEYS, source)
    for required in ("backbones", "trials_per_backbone"):
        if required not in raw:
            raise _fail(source, f"missing required key '{required}'")
    name = str(raw.get("name") or Path(source).stem)

    metric = raw.get("metric", "val_loss")
    if metric not in METRICS:
        raise _fail(f"{source}: metric", f"unknown metric '{metric}' (known: {', '.join(METRICS)})")
    mode = raw.get("mode", "min" if metric.endswith("loss") else "max")
    if mode not in ("min", "max"):
        raise _fail(f"{source}: mode", f"'{mode}' is not min or max")

    backbones = raw["backbones"]
    if isinstance(backbones, str):
        backbones = [backbones]
    if not isinstance(backbones, list) or not backbones:
        raise _fail(f"{source}: backbones", "expected a non-empty list of backbone names")
    for backbone in backbones:
        if backbone not in BACKBONES:
            raise _fail(
                f"{source}: backbones",
                f"unknown backbone '{backbone}' (known: {', '.join(BACKBONES)})",
            )
    if len(set(backbones)) != len(backbones):
        raise _fail(f"{source}: backbones", "a backbone is listed twice")

    def positive_int(key: str, default: int, minimum: int) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(f"{source}: {key}", f"expected a whole number >= {minimum}, got {value!r}")
        return value

    trials = positive_int("trials_per_backbone", 1, 1)
    final_seeds = positive_int("final_seeds", 0, 0)
    seed = positive_int("seed", 0, 0)

    scheduler = raw.get("scheduler") or {"type": "none"}
    if isinstance(scheduler, str):
        scheduler = {"type": scheduler}
    _check_known(scheduler, SCHEDULER_KEYS, f"{source}: scheduler")
    scheduler = dict(scheduler)
    scheduler.setdefault("type", "asha")
    if scheduler["type"] not in SCHEDULERS:
        raise _fail(
            f"{source}: scheduler.type",
            f"unknown scheduler '{scheduler['type']}' (known: {', '.join(SCHEDULERS)})",
        )
    if scheduler["type"] == "asha":
        for key, default, minimum in (("grace_period", 1, 1), ("reduction_factor", 3, 2)):
            value = scheduler.setdefault(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise _fail(
                    f"{source}: scheduler.{key}",
                    f"expected a whole number >= {minimum}, got {value!r}",
                )

    fixed_raw = raw.get("fixed") or {}
    _check_known(fixed_raw, tuple(PARAMS), f"{source}: fixed")
    fixed = _parse_fixed(fixed_raw, f"{source}: fixed")

    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise _fail(f"{source}: space", "expected a mapping of config key -> distribution")
    space = {}
    for key, spec in space_raw.items():
        _check_param_key(key, f"{source}: space")
        if key in fixed:
            raise _fail(f"{source}: space", f"'{key}' is both fixed and tuned")
        space[key] = _parse_dist(key, spec, f"{source}: space")

    start_points = list(
        _parse_points(
            raw.get("start_points") or [],
            space,
            f"{source}: start_points",
            fixed,
            "every key of 'space'",
        )
    )
    if not space and trials > 1:
        raise _fail(
            f"{source}: trials_per_backbone",
            f"{trials} trials but nothing to tune ('space' is empty)",
        )
    if len(start_points) > trials:
        raise _fail(
            f"{source}: start_points",
            f"{len(start_points)} start points exceed trials_per_backbone={trials}",
        )
    per_backbone = _parse_per_backbone(
        raw.get("per_backbone"), backbones, space, f"{source}: per_backbone"
    )
    out = Space(
        name=name,
        metric=metric,
        mode=mode,
        backbones=tuple(backbones),
        trials_per_backbone=trials,
        scheduler=scheduler,
        fixed=fixed,
        space=space,
        start_points=tuple(start_points),
        final_seeds=final_seeds,
        seed=seed,
        source=source,
        per_backbone=per_backbone,
    )
    _check_each_backbone(out, source)
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
        raise _fail(
            where,
            f"environment variable {name} is not set (used in {value!r}; set it, or write ${{{name}:-default}})",
        )

    return _ENV_VAR.sub(substitute, value)


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _parse_fixed(values: dict, where: str) -> dict:
    """Fixed config values, coerced; `${VAR}` expanded; a weights file must exist (made absolute)."""
    expanded = {}
    for key, value in values.items():
        _check_param_key(key, where)
        expanded[key] = _expand_env(value, f"{where}.{key}")
    try:
        coerced = make_config(expanded)
    except UserError as exc:
        raise _fail(where, str(exc)) from None
    out = {key: coerced[key] for key in expanded}
    if out.get("weights") not in (None, "imagenet", "none"):
        path = Path(out["weights"]).expanduser()
        if not path.is_file():
            raise _fail(
                f"{where}.weights",
                f"weights file not found: {path} (relative paths start from the current directory {Path.cwd()})",
            )
        out["weights"] = str(path.resolve())
    return out


def _parse_per_backbone(raw: Any, backbones: list, space: dict, where: str) -> dict:
    """`per_backbone: {backbone: {key: value or distribution}}` -> {backbone: {key: value or Dist}}."""
    from fer.model.backbones import BACKBONES

    if not raw:
        return {}
    if not isinstance(raw, dict):
        raise _fail(where, "expected a mapping backbone -> {config key: value or distribution}")
    out = {}
    for backbone, settings in raw.items():
        if backbone not in BACKBONES:
            raise _fail(where, f"unknown backbone '{backbone}' (known: {', '.join(BACKBONES)})")
        if backbone not in backbones:
            raise _fail(
                where, f"'{backbone}' is not one of the study's backbones ({', '.join(backbones)})"
            )
        here = f"{where}.{backbone}"
        if not isinstance(settings, dict) or not settings:
            raise _fail(
                here, f"expected a mapping of config key -> value or distribution, got {settings!r}"
            )
        points = settings.get(START_POINTS)
        settings = {k: v for k, v in settings.items() if k != START_POINTS}
        own = _parse_fixed({k: v for k, v in settings.items() if not isinstance(v, dict)}, here)
        for key, spec in settings.items():
            if isinstance(spec, dict):
                _check_param_key(key, here)
                if key not in space:
                    raise _fail(
                        f"{here}.{key}",
                        f"'{key}' is not tuned in 'space' (a distribution here only "
                        "gives a tuned key this backbone's own range); give a plain value",
                    )
                own[key] = _parse_dist(key, spec, here)
        if points is not None:
            own[START_POINTS] = _parse_own_points(points, own, space, f"{here}.{START_POINTS}")
        out[backbone] = own
    return out


def _parse_own_points(points: Any, own: dict, space: dict, where: str) -> tuple:
    """A backbone's own start points: each sets every key it tunes (they replace the shared ones for
    it)."""
    tuned = {
        k: own.get(k, dist) for k, dist in space.items() if k not in own or isinstance(own[k], Dist)
    }
    return _parse_points(points, tuned, where, {}, "every key this backbone tunes")


def _parse_points(points: Any, tuned: dict, where: str, fixed: dict, scope: str) -> tuple:
    """Start points: each sets every key of `tuned` (named by `scope` in the error), coerced in the
    context of `fixed`, and lies inside its distribution."""
    if not isinstance(points, list):
        raise _fail(where, "expected a list of mappings")
    out = []
    for i, point in enumerate(points):
        here = f"{where}[{i}]"
        _check_known(point, tuple(tuned), here)
        missing = [key for key in tuned if key not in point]
        if missing:
            raise _fail(here, f"missing tuned key '{missing[0]}' (a start point sets {scope})")
        try:
            coerced = make_config({**fixed, **point})
        except UserError as exc:
            raise _fail(here, str(exc)) from None
        point = {key: coerced[key] for key in tuned}
        for key, value in point.items():
            if not tuned[key].contains(value):
                raise _fail(
                    here, f"'{key}': {value!r} lies outside its distribution {tuned[key].as_dict()}"
                )
        out.append(point)
    return tuple(out)


def _check_each_backbone(space: Space, source: str) -> None:
    """What must hold for every backbone's own settings: start points inside its ranges, something
    to tune when it gets several trials, epochs to train, a scheduler grace period it reaches, its
    minimum size."""
    from fer.model.backbones import get_backbone

    for backbone in space.backbones:
        tuned = space.space_for(backbone)
        where = f"{source}: per_backbone.{backbone}" if backbone in space.per_backbone else source
        if len(space.start_points_for(backbone)) > space.trials_per_backbone:
            raise _fail(
                f"{where}.{START_POINTS}"
                if backbone in space.per_backbone
                else f"{source}: {START_POINTS}",
                f"{len(space.start_points_for(backbone))} start points exceed "
                f"trials_per_backbone={space.trials_per_backbone}",
            )
        for i, point in enumerate(space.start_points_for(backbone)):
            for key, value in point.items():
                if not tuned[key].contains(value):
                    raise _fail(
                        f"{source}: start_points[{i}]",
                        f"'{key}': {value!r} lies outside {backbone}'s distribution {tuned[key].as_dict()}",
                    )
        if not tuned and space.trials_per_backbone > 1:
            raise _fail(
                where if backbone in space.per_backbone else f"{source}: trials_per_backbone",
                f"{space.trials_per_backbone} trials of {backbone} but nothing to tune for it",
            )
        epochs = space.max_epochs(backbone)
        if epochs < 1:
            raise _fail(
                where, f"epochs_head + epochs_finetune is 0 for {backbone}: trials would not train"
            )
        if space.scheduler["type"] == "asha" and space.scheduler["grace_period"] > epochs:
            raise _fail(
                f"{source}: scheduler.grace_period",
                f"{space.scheduler['grace_period']} exceeds the {epochs} epochs a trial of {backbone} runs",
            )
        if "image_size" in tuned and tuned["image_size"].kind != "choice":
            low = tuned["image_size"].args[0]
        else:
            low = min(space.image_sizes(backbone))
        if low < get_backbone(backbone).min_size:
            key = (
                f"per_backbone.{backbone}.image_size"
                if "image_size" in space.per_backbone.get(backbone, {})
                else "image_size"
            )
            raise _fail(
                f"{source}: {key}",
                f"{low} is below {backbone}'s minimum of {get_backbone(backbone).min_size}",
            )
        unfreeze = (
            tuned["unfreeze_layers"].args[0]
            if "unfreeze_layers" in tuned
            else space.fixed_for(backbone).get("unfreeze_layers", PARAMS["unfreeze_layers"].default)
        )
        try:
            # the rules between keys (fer.core.config.check_rules), at the backbone's smallest size
            # and depth
            check_rules(
                {
                    **default_config(),
                    **space.fixed_for(backbone),
                    "image_size": low,
                    "unfreeze_layers": unfreeze,
                    "backbone": backbone,
                }
            )
        except UserError as exc:
            raise _fail(f"{where}", str(exc)) from None


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
