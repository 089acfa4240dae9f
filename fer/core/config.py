"""Trial configuration: one flat dict of named hyperparameters, validated in one place.

The same keys are used by `fer-study train --set key=value`, by search-space YAML (`fixed:` and
`space:`) and by `config.json` in every trial folder. Defaults reproduce the published method.
`PARAMS` holds each key's one default and range (docs/config.md is generated from it:
`markdown_table`); `make_config` checks every key and every rule between keys (`check_rules`). A
trial validates its config once, in `fer.train.trial.run_trial`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fer.core.errors import UserError
from fer.core.files import write_json


@dataclasses.dataclass(frozen=True)
class Param:
    """One configuration key: its type, default, allowed range or choices, and what it means."""

    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    help: str = ""


PARAMS: dict[str, Param] = {
    "backbone": Param(
        str,
        "efficientnetb1",
        help="the backbone: a name in the registry of fer.model.backbones "
        "(`fer-study train --help` lists them)",
    ),
    "image_size": Param(
        int,
        224,
        32,
        1024,
        help="square input size in pixels (images are squashed to it); at least the backbone's "
        "minimum (75 for inceptionv3); also `prepare --image-size`",
    ),
    "weights": Param(str, "imagenet", help="'imagenet', 'none', or a path to a weights file"),
    "dense_units": Param(int, 256, 1, 8192, help="units of the head's hidden Dense layer"),
    "dropout": Param(float, 0.53, 0.0, 0.95, help="dropout rate before the softmax layer"),
    "unfreeze_layers": Param(
        int, 30, 0, 10000, help="backbone layers (or blocks) trainable in stage 2"
    ),
    "unfreeze_unit": Param(
        str,
        "layers",
        choices=("layers", "blocks"),
        help="count unfrozen 'layers' (published) or whole 'blocks' of the backbone",
    ),
    "lr_head": Param(
        float, 1e-3, 1e-7, 1.0, help="Adam learning rate of stage 1 (frozen backbone)"
    ),
    "lr_finetune": Param(
        float, 1e-4, 1e-9, 1.0, help="Adam learning rate of stage 2 (fine-tuning)"
    ),
    "batch_size": Param(
        int, 32, 1, 4096, help="images per training step (and per prediction batch)"
    ),
    "epochs_head": Param(int, 20, 0, 10000, help="maximum epochs of stage 1"),
    "epochs_finetune": Param(int, 20, 0, 10000, help="maximum epochs of stage 2"),
    "patience": Param(int, 5, 1, 1000, help="early-stopping patience (reduce-LR uses half of it)"),
    "augment": Param(float, 1.0, 0.0, 5.0, help="augmentation strength; 0 disables, 1 = published"),
    "label_smoothing": Param(
        float, 0.0, 0.0, 0.5, help="label smoothing of the cross-entropy loss"
    ),
    "bn_epsilon": Param(
        float,
        0.0,
        0.0,
        0.1,
        help="epsilon of the backbone's BatchNormalization layers; 0 keeps the backbone's own "
        "(1e-3 in keras.applications); weights ported from PyTorch need 1e-5",
    ),
    "seed": Param(
        int,
        0,
        0,
        2**31 - 1,
        help="seed of the weight initialisation, shuffling, augmentation and bootstrap intervals",
    ),
    "head_features": Param(
        str,
        "exact",
        choices=("exact", "cached"),
        help="'cached' trains stage 1 on precomputed backbone features (faster)",
    ),
    "finetune_features": Param(
        str,
        "exact",
        choices=("exact", "cached"),
        help="'cached' trains stage 2 on precomputed activations of the frozen early "
        "layers (faster; see fer.train.feature_cache)",
    ),
    "finetune_cache_units": Param(
        int,
        0,
        0,
        10000,
        help="with finetune_features=cached: cache the activations entering the last N "
        "backbone layers (or blocks, as unfreeze_unit); 0 = unfreeze_layers. A "
        "study sets it to its space's largest unfreeze_layers, so trials share "
        "one cache",
    ),
    "feature_views": Param(
        int,
        5,
        1,
        100,
        help="with head_features or finetune_features cached: augmented views per train "
        "image, computed once per study and cycled through one per epoch",
    ),
    "mixed_precision": Param(
        str,
        "auto",
        choices=("auto", "off", "bfloat16", "float16"),
        help="'auto' uses bfloat16/float16 on GPUs and float32 on CPUs",
    ),
    "tta_flip": Param(
        int,
        0,
        0,
        1,
        help="1: every evaluation of the trained model (the per-epoch val metrics that pick the "
        "best epoch and trial, val_metrics.json, the test split, `evaluate`, `predict`) averages "
        "the softmax of each image and its left-right mirror; costs one more prediction pass; "
        "needs head_features and finetune_features exact",
    ),
}


def coerce(key: str, value: Any) -> Any:
    """One key's value, converted to the key's type and checked against its range or choices."""
    spec = PARAMS[key]
    try:
        if spec.type is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = int(float(value)) if isinstance(value, str) else int(value)
        elif spec.type is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        else:
            out = str(value)
    except (TypeError, ValueError):
        raise UserError(
            f"config key '{key}': expected {spec.type.__name__}, got {value!r}"
        ) from None
    if spec.low is not None and not (spec.low <= out <= spec.high):
        raise UserError(f"config key '{key}': {out!r} is outside [{spec.low}, {spec.high}]")
    if spec.choices is not None and out not in spec.choices:
        raise UserError(f"config key '{key}': {out!r} is not one of {', '.join(spec.choices)}")
    return out


def make_config(overrides: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Return a full, validated config: defaults updated by `overrides` and keyword arguments.

    Unknown keys and out-of-range values raise `UserError` naming the key.
    """
    merged = dict(overrides or {}, **kwargs)
    unknown = sorted(set(merged) - set(PARAMS))
    if unknown:
        raise UserError(f"unknown config key '{unknown[0]}' (known: {', '.join(PARAMS)})")
    config = default_config()
    for key, value in merged.items():
        config[key] = coerce(key, value)
    check_rules(config)
    return config


def default_config() -> dict[str, Any]:
    """Every key at its default (not validated: the defaults are valid by construction)."""
    return {key: spec.default for key, spec in PARAMS.items()}


def check_rules(config: dict[str, Any]) -> None:
    """The rules between keys of a full config (each key's own range is checked by `coerce`)."""
    from fer.model.backbones import BACKBONES  # late import: the registry may grow at runtime

    backbone = BACKBONES.get(config["backbone"])
    if backbone is None:
        raise UserError(f"unknown backbone '{config['backbone']}' (known: {', '.join(BACKBONES)})")
    if config["image_size"] < backbone.min_size:
        raise UserError(
            f"image_size {config['image_size']} is below {backbone.name}'s minimum of "
            f"{backbone.min_size}"
        )
    cached = [
        f"{stage}_features"
        for stage in ("head", "finetune")
        if config[f"{stage}_features"] == "cached" and config[f"epochs_{stage}"] > 0
    ]
    if config["tta_flip"] and cached:
        raise UserError(
            f"tta_flip 1 needs {' and '.join(cached)} exact: the cached val features are of "
            "unmirrored images, so the per-epoch val metrics could not average the mirror"
        )
    if 0 < config["finetune_cache_units"] < config["unfreeze_layers"]:
        raise UserError(
            f"finetune_cache_units {config['finetune_cache_units']} is below unfreeze_layers "
            f"{config['unfreeze_layers']}: the cached activations must enter every trainable layer"
        )


def markdown_table() -> str:
    """The Markdown table of every key (docs/config.md holds it; tests/test_docs.py checks it is
    current)."""

    def show(value: Any) -> str:
        return "`none`" if value is None else f"`{value}`"

    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, spec in PARAMS.items():
        if spec.choices is not None:
            allowed = ", ".join(f"`{c}`" for c in spec.choices)
        elif spec.low is not None:
            allowed = f"{show(spec.low)} to {show(spec.high)}"
        else:
            allowed = "see meaning"
        meaning = spec.help.replace("|", "\\|")
        lines.append(
            f"| `{key}` | {spec.type.__name__} | {show(spec.default)} | {allowed} | {meaning} |"
        )
    return "\n".join(lines) + "\n"


def parse_set_options(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Parse `--set key=value` strings; values stay strings until `make_config` coerces them."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def save_config(config: dict[str, Any], path: str | Path) -> None:
    write_json(Path(path), config, sort_keys=True)


def load_config(path: str | Path) -> dict[str, Any]:
    return make_config(json.loads(Path(path).read_text()))
