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

The parts: `keys` (the allowed keys and the error format), `distributions` (`Dist`),
`search_space` (`Space` and its per-backbone views), `parsing` (file -> `Space`, section by
section), `backbone_checks` (what must hold for every backbone).
"""

from __future__ import annotations

from study.space.distributions import Dist
from study.space.keys import METRICS
from study.space.parsing import load_space, parse_space
from study.space.search_space import Space

__all__ = ["METRICS", "Dist", "Space", "load_space", "parse_space"]
