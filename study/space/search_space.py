"""The validated search space (`Space`) and what it means for each backbone.

A comparison of backbones often needs each one's own weights file, image size or learning-rate
range, so every question the study asks of a space is asked per backbone: `fixed_for`, `space_for`,
`start_points_for`, `config_for`. A backbone without per-backbone settings gets the shared ones.
"""

from __future__ import annotations

import dataclasses

from fer.core.config import PARAMS, default_config
from study.space.distributions import Dist
from study.space.keys import START_POINTS

# ASHA's clocks (the reported key its rungs count, study.tune.search): the global epoch across both
# stages, or the fine-tune epochs run so far (0 through the head stage)
EPOCH = "epoch"
FINETUNE_EPOCH = "finetune_epoch"


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
        """The keys tuned for `backbone` and their distributions (its own range where it has
        one)."""
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

    def smallest(self, key: str, backbone: str):
        """The smallest value `key` takes for `backbone` in this space (tuned or fixed)."""
        space = self.space_for(backbone)
        if key in space:
            dist = space[key]
            return min(dist.args) if dist.kind == "choice" else dist.args[0]
        return self.fixed_for(backbone).get(key, PARAMS[key].default)

    def max_epochs(self, backbone: str | None = None) -> int:
        """The most epochs a trial of `backbone` (default: of any backbone) can run."""
        if backbone is None:
            return max(self.max_epochs(b) for b in self.backbones)
        return int(self.largest("epochs_head", backbone)) + int(
            self.largest("epochs_finetune", backbone)
        )

    def rung_clock(self, backbone: str) -> str:
        """What ASHA's rungs count for `backbone`: fine-tune epochs when every trial of it
        fine-tunes, so trials are compared only once every searched parameter has acted (a head
        stage judges neither unfreeze_layers nor lr_finetune); the global epoch when its training
        is one stage (epochs_finetune 0; a from-scratch model with epochs_head 0 counts the same
        either way), or when only some of its trials fine-tune (a tuned epochs_finetune from 0)."""
        return FINETUNE_EPOCH if int(self.smallest("epochs_finetune", backbone)) > 0 else EPOCH

    def rung_epochs(self, backbone: str) -> int:
        """The most epochs a trial of `backbone` runs on its rung clock (ASHA's max_t - 1)."""
        if self.rung_clock(backbone) == FINETUNE_EPOCH:
            return int(self.largest("epochs_finetune", backbone))
        return self.max_epochs(backbone)

    def warnings(self) -> list[str]:
        """Settings that are valid but likely to mislead, one sentence each (`run` prints them at
        start).

        ASHA's first rung inside a backbone's head stage: trials are then stopped on head-only
        accuracy, which says little about how a trial fine-tunes. Rungs count fine-tune epochs
        wherever every trial fine-tunes (`rung_clock`), so only a backbone whose epochs_finetune is
        tuned from 0 and whose head stage reaches the grace period is left to warn about."""
        if self.scheduler.get("type") != "asha":
            return []
        grace = int(self.scheduler["grace_period"])
        heads = {b: int(self.largest("epochs_head", b)) for b in self.backbones}
        inside = [
            b
            for b, head in heads.items()
            if grace <= head
            and self.rung_clock(b) == EPOCH
            and int(self.largest("epochs_finetune", b)) > 0
        ]
        if not inside:
            return []
        named = ", ".join(f"{b} ({heads[b]})" for b in inside)
        return [
            f"ASHA's first rung (epoch {grace}) falls in the head stage of {named} "
            "(head epochs in brackets), whose epochs_finetune is tuned from 0: trials are stopped "
            "on head-only accuracy before any fine-tuning; tune epochs_finetune from 1 (rungs "
            "then count fine-tune epochs) or set scheduler.grace_period above the head epochs"
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
        # only when used: study.json of earlier studies stays comparable on --resume
        if self.per_backbone:
            out["per_backbone"] = {b: _own_as_data(own) for b, own in self.per_backbone.items()}
        return out


def _own_as_data(own: dict) -> dict:
    """One backbone's settings as plain data: distributions and start points written out."""

    def as_data(key: str, value):
        if isinstance(value, Dist):
            return value.as_dict()
        if key == START_POINTS:
            return [dict(p) for p in value]
        return value

    return {k: as_data(k, v) for k, v in own.items()}
