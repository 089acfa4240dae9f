"""The space file's vocabulary: which keys are allowed where, and the one error format of every
check.

Every validation error is `"<file>: <key path>: <what is wrong>"` (`fail`), one line, so a typo in a
space names the key to fix.
"""

from __future__ import annotations

from typing import Any

from fer.core.config import PARAMS
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


def fail(where: str, message: str) -> UserError:
    """The error to raise: `where` names the file and the key."""
    return UserError(f"{where}: {message}")


def check_known(mapping: Any, allowed: tuple, where: str) -> dict:
    """`mapping` is a mapping whose keys are all in `allowed`; returned as is."""
    if not isinstance(mapping, dict):
        raise fail(where, f"expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            raise fail(where, f"unknown key '{key}' (allowed: {', '.join(allowed)})")
    return mapping


def check_param_key(key: Any, where: str) -> None:
    """`key` is a trial-config key a space may fix or tune."""
    if key not in PARAMS:
        raise fail(where, f"unknown config key '{key}' (known: {', '.join(PARAMS)})")
    if key in UNTUNABLE:
        raise fail(where, f"'{key}' is set by 'backbones:', not here")
