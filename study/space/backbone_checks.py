"""What must hold for every backbone once its own settings are merged with the shared ones.

A space can be valid key by key and still give one backbone trials that cannot run: start points
outside its own ranges, several trials with nothing to tune, no epochs, a scheduler grace period it
never reaches, images below its minimum size, or keys that break the config rules at its smallest
size and depth. Each is caught here, at load time, naming that backbone.
"""

from __future__ import annotations

import dataclasses

from fer.core.config import PARAMS, check_rules, default_config
from fer.core.errors import UserError
from study.space.keys import START_POINTS, fail
from study.space.search_space import Space


@dataclasses.dataclass(frozen=True)
class _Backbone:
    """One backbone of a space, as the checks see it."""

    name: str
    source: str  # the space file, first word of every error
    has_own: bool  # it has per_backbone settings: errors name them
    tuned: dict  # key -> Dist it tunes (its own range where it has one)

    @property
    def where(self) -> str:
        return f"{self.source}: per_backbone.{self.name}" if self.has_own else self.source


def check_each_backbone(space: Space, source: str) -> None:
    """Start points inside its ranges, something to tune when it gets several trials, epochs to
    train, a scheduler grace period it reaches, its minimum size, and the config rules."""
    for name in space.backbones:
        backbone = _Backbone(name, source, name in space.per_backbone, space.space_for(name))
        _check_start_points(space, backbone)
        _check_something_to_tune(space, backbone)
        _check_epochs(space, backbone)
        low = _check_min_size(space, backbone)
        _check_rules_at_smallest(space, backbone, low)


def _check_start_points(space: Space, backbone: _Backbone) -> None:
    """Its start points fit in its trials and lie inside its own distributions."""
    points = space.start_points_for(backbone.name)
    if len(points) > space.trials_per_backbone:
        raise fail(
            f"{backbone.where}.{START_POINTS}"
            if backbone.has_own
            else f"{backbone.source}: {START_POINTS}",
            f"{len(points)} start points exceed trials_per_backbone={space.trials_per_backbone}",
        )
    tuned = backbone.tuned
    for i, point in enumerate(points):
        for key, value in point.items():
            if not tuned[key].contains(value):
                raise fail(
                    f"{backbone.source}: start_points[{i}]",
                    f"'{key}': {value!r} lies outside {backbone.name}'s distribution "
                    f"{tuned[key].as_dict()}",
                )


def _check_something_to_tune(space: Space, backbone: _Backbone) -> None:
    if not backbone.tuned and space.trials_per_backbone > 1:
        raise fail(
            backbone.where if backbone.has_own else f"{backbone.source}: trials_per_backbone",
            f"{space.trials_per_backbone} trials of {backbone.name} but nothing to tune for it",
        )


def _check_epochs(space: Space, backbone: _Backbone) -> None:
    """Its trials train at least one epoch, and reach ASHA's first rung."""
    epochs = space.max_epochs(backbone.name)
    if epochs < 1:
        raise fail(
            backbone.where,
            f"epochs_head + epochs_finetune is 0 for {backbone.name}: trials would not train",
        )
    rung_epochs = space.rung_epochs(backbone.name)  # what ASHA's rungs count (Space.rung_clock)
    if space.scheduler["type"] == "asha" and space.scheduler["grace_period"] > rung_epochs:
        counted = "fine-tune epochs" if rung_epochs != epochs else "epochs"
        raise fail(
            f"{backbone.source}: scheduler.grace_period",
            f"{space.scheduler['grace_period']} exceeds the {rung_epochs} {counted} a trial of "
            f"{backbone.name} runs (ASHA's rungs count them)",
        )


def _check_min_size(space: Space, backbone: _Backbone) -> int:
    """Its smallest image size is at least the backbone's minimum; returns that size."""
    from fer.model.backbones import get_backbone

    tuned = backbone.tuned
    if "image_size" in tuned and tuned["image_size"].kind != "choice":
        low = tuned["image_size"].args[0]
    else:
        low = min(space.image_sizes(backbone.name))
    minimum = get_backbone(backbone.name).min_size
    if low < minimum:
        key = (
            f"per_backbone.{backbone.name}.image_size"
            if "image_size" in space.per_backbone.get(backbone.name, {})
            else "image_size"
        )
        raise fail(
            f"{backbone.source}: {key}",
            f"{low} is below {backbone.name}'s minimum of {minimum}",
        )
    return low


def _check_rules_at_smallest(space: Space, backbone: _Backbone, low: int) -> None:
    """The rules between keys (fer.core.config.check_rules), at the backbone's smallest size and
    depth."""
    tuned = backbone.tuned
    unfreeze = (
        tuned["unfreeze_layers"].args[0]
        if "unfreeze_layers" in tuned
        else space.fixed_for(backbone.name).get(
            "unfreeze_layers", PARAMS["unfreeze_layers"].default
        )
    )
    try:
        check_rules(
            {
                **default_config(),
                **space.fixed_for(backbone.name),
                "image_size": low,
                "unfreeze_layers": unfreeze,
                "backbone": backbone.name,
            }
        )
    except UserError as exc:
        raise fail(f"{backbone.where}", str(exc)) from None
