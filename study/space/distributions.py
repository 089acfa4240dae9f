"""One tuned key's distribution: `Dist`, and reading it from the space file.

One key each: `uniform: [lo, hi]`, `loguniform: [lo, hi]` (lo > 0), `int: [lo, hi]` (inclusive),
`choice: [a, b, ...]`. Ranges must lie inside the key's allowed range (fer.core.config.PARAMS), and
the kind must fit the key's type, so a search never draws a value the trial would reject.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fer.core.config import PARAMS, coerce
from fer.core.errors import UserError
from study.space.keys import DISTRIBUTIONS, fail


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


def parse_dist(key: str, spec: Any, where: str) -> Dist:
    """`spec` (e.g. `{uniform: [0.1, 0.5]}`) as the distribution of config key `key`."""
    where = f"{where}.{key}"
    kind, args = _kind_and_args(spec, where)
    if kind == "choice":
        return _parse_choice(key, args, where)
    _check_kind_fits_type(key, kind, where)
    lo, hi = _parse_bounds(key, kind, args, where)
    if kind == "int":
        return Dist("int", (int(lo), int(hi)))
    return Dist(kind, (float(lo), float(hi)))


def _kind_and_args(spec: Any, where: str) -> tuple[str, list]:
    """A mapping with one known distribution name and a non-empty list of arguments."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise fail(
            where, f"expected one of {', '.join(DISTRIBUTIONS)} with its arguments, got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise fail(where, f"unknown distribution '{kind}' (known: {', '.join(DISTRIBUTIONS)})")
    if not isinstance(args, list) or not args:
        raise fail(where, f"'{kind}' needs a list of values, got {args!r}")
    return kind, args


def _parse_choice(key: str, args: list, where: str) -> Dist:
    """Choices coerced like the key's fixed values, each once."""
    values = []
    for value in args:
        try:
            values.append(coerce(key, value))
        except UserError as exc:
            raise fail(where, str(exc)) from None
    if len(set(values)) != len(values):
        raise fail(where, f"duplicate choices in {args!r}")
    return Dist("choice", tuple(values))


def _check_kind_fits_type(key: str, kind: str, where: str) -> None:
    """Text keys take choices only; integer keys `int`; float keys `uniform` or `loguniform`."""
    param = PARAMS[key]
    if param.type is str:
        raise fail(where, f"'{key}' takes text values: use 'choice', not '{kind}'")
    if kind == "int" and param.type is not int:
        raise fail(where, f"'{key}' is a float: use 'uniform' or 'loguniform', not 'int'")
    if kind in ("uniform", "loguniform") and param.type is int:
        raise fail(where, f"'{key}' is an integer: use 'int' or 'choice', not '{kind}'")


def _parse_bounds(key: str, kind: str, args: list, where: str) -> tuple:
    """[low, high]: numbers, low below high, inside the key's allowed range."""
    if len(args) != 2 or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
    ):
        raise fail(where, f"'{kind}' needs [low, high] numbers, got {args!r}")
    lo, hi = args
    if kind == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise fail(where, f"'int' needs whole-number bounds, got {args!r}")
    if not lo < hi:
        raise fail(where, f"bad range [{lo}, {hi}]: low must be below high")
    if kind == "loguniform" and lo <= 0:
        raise fail(where, f"bad range [{lo}, {hi}]: loguniform needs low > 0")
    param = PARAMS[key]
    if param.low is not None and (lo < param.low or hi > param.high):
        raise fail(
            where, f"bad range [{lo}, {hi}]: '{key}' must stay within [{param.low}, {param.high}]"
        )
    return lo, hi
