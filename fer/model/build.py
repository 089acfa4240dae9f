"""The FER model: [augment] -> preprocess -> backbone (flat) -> GAP -> Dense -> Dropout -> softmax.

Layer naming is a contract other modules rely on: the input is `image`, augmentation layers start
with `aug_`, the scaling layer is `preprocess`, head layers start with `head_`; every other layer
belongs to the backbone. So "the last N backbone layers" and Grad-CAM's target layer can be found in
a reloaded `model.keras` without rebuilding anything.
"""

from __future__ import annotations

from pathlib import Path

import keras

from fer.core.errors import UserError
from fer.model.backbones import Backbone, get_backbone
from fer.model.layers import HeadDropout, Preprocess, augmentation_layers

HEAD_PREFIX = "head_"
AUG_PREFIX = "aug_"
NON_BACKBONE = ("image", "preprocess")


def is_backbone_layer(layer: keras.layers.Layer) -> bool:
    name = layer.name
    return not (name.startswith(HEAD_PREFIX) or name.startswith(AUG_PREFIX) or name in NON_BACKBONE)


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Backbone layers in topological order (excluding the input layer)."""
    return [
        layer
        for layer in model.layers
        if is_backbone_layer(layer) and not isinstance(layer, keras.layers.InputLayer)
    ]


def _resolve_weights(weights: str) -> str | None:
    """Map the `weights` config value to what keras.applications takes, checking files early."""
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights file not found: {weights} (use --set weights=none or a real path)"
        )
    return str(path)


def build_backbone(backbone: Backbone, x, weights: str) -> keras.Model:
    """Build the backbone on tensor `x` with the requested weights, with a clear error when
    offline."""
    resolved = _resolve_weights(weights)
    if resolved in (None, "imagenet"):
        try:
            return backbone.build(x, resolved)
        except UserError:
            raise
        except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
            if resolved is None:
                raise
            reason = _first_line(exc)
            raise UserError(
                f"could not download ImageNet weights for {backbone.name} ({reason}); "
                "pass a local weights file with --weights PATH (or --set weights=PATH), or use "
                "--set weights=none"
            ) from None
    net = backbone.build(x, None)
    try:
        net.load_weights(resolved)
    except Exception as exc:
        raise UserError(
            f"could not load weights file {resolved} into {backbone.name}: {_first_line(exc)}"
        ) from None
    return net


def _first_line(exc: Exception, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def load_trained_model(path: str | Path) -> keras.Model:
    """Load a trial's `model.keras` for inference (Grad-CAM, predict): custom layers registered, not
    compiled."""
    import fer.model.layers  # noqa: F401  (registers Preprocess for deserialisation)

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise UserError(f"could not load model {path}: {_first_line(exc)}") from None


def build_model(config: dict, num_classes: int) -> keras.Model:
    """Build the full model for a validated config (see fer.core.config). The backbone starts
    frozen."""
    backbone = get_backbone(config["backbone"])
    size = config["image_size"]
    keras.utils.set_random_seed(config["seed"])
    inputs = keras.Input((size, size, 3), name="image")
    x = inputs
    for layer in augmentation_layers(config["augment"], config["seed"]):
        x = layer(x)
    x = Preprocess(backbone.preprocess, name="preprocess")(x)
    net = build_backbone(backbone, x, config["weights"])
    if config.get("bn_epsilon", 0.0) > 0:
        set_bn_epsilon(net, config["bn_epsilon"])
    if config["weights"] == "none":
        set_bn_momentum(net, FROM_SCRATCH_BN_MOMENTUM)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(net.output)
    x = keras.layers.Dense(config["dense_units"], activation="relu", name="head_dense")(x)
    x = HeadDropout(config["dropout"], name="head_dropout")(
        x
    )  # the rate is a variable: one program per shape
    # float32 softmax keeps the loss stable under mixed precision.
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="head_out"
    )(x)
    model = keras.Model(inputs, outputs, name=f"fer_{backbone.name}")
    set_stage(model, "head", 0, config.get("unfreeze_unit", "layers"), backbone)
    return model


def set_bn_epsilon(net: keras.Model, epsilon: float) -> None:
    """Use the epsilon the weights were trained with. keras.applications uses 1e-3, PyTorch 1e-5;
    with the wrong one, BN layers with small running variances squash their outputs (a ported
    model's pooled features then hardly vary across images). Saved in model.keras with each layer's
    config."""
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.epsilon = float(epsilon)


FROM_SCRATCH_BN_MOMENTUM = 0.9


def set_bn_momentum(net: keras.Model, momentum: float) -> None:
    """Let a backbone trained from scratch keep its BatchNormalization statistics current. With
    Keras's 0.99 the moving averages lag a network whose weights still change fast, so inference
    (which uses them) sees other statistics than training did: mobilenet025 from random weights on
    the demo data reached 0.64 training-mode accuracy while predicting one class for every
    validation image after 8 epochs; with 0.9 (PyTorch's default) the same run predicted all classes
    and improved from the second epoch on."""
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)


def set_stage(
    model: keras.Model,
    stage: str,
    unfreeze: int,
    unit: str = "layers",
    backbone: Backbone | None = None,
    train_batchnorm: bool = False,
) -> int:
    """Freeze the backbone (stage 'head') or unfreeze its last `unfreeze` layers/blocks
    ('finetune').

    BatchNormalization layers stay frozen (trainable=False, hence inference mode) in both stages, as
    in the Keras fine-tuning guide: the pretrained layers after each BN expect the ImageNet
    statistics it holds; with small batches those would be overwritten by noisy batch estimates
    (wrecking what the frozen head stage learned); and Keras 3 runs a trainable BN in training mode
    even under `training=False` (docs/pitfalls.md#frozen-batchnorm). The exception is a backbone
    trained from scratch (`weights=none`, `train_batchnorm=True`): its BN layers hold no statistics
    worth protecting, and frozen at their initial values (mean 0, variance 1) they let activations
    vanish through a deep random network, so nothing learns (FER2013, MobileNetV2 at 96 px: test
    accuracy 0.17, below chance). Then the unfrozen range's BN layers train too. Returns the number
    of layers made trainable. Recompile afterwards (docs/pitfalls.md#recompile).
    """
    for layer in model.layers:
        layer.trainable = not is_backbone_layer(layer)
    if stage == "head" or unfreeze <= 0:
        return 0
    count = 0
    for layer in last_backbone_layers(model, unfreeze, unit, backbone):
        if isinstance(layer, keras.layers.BatchNormalization) and not train_batchnorm:
            continue
        layer.trainable = True
        count += 1
    return count


def last_backbone_layers(
    model: keras.Model, count: int, unit: str = "layers", backbone: Backbone | None = None
) -> list[keras.layers.Layer]:
    """The last `count` backbone layers, or the layers of its last `count` blocks (unit 'blocks'),
    in reverse topological order. Always a suffix of `backbone_layers(model)`."""
    layers = backbone_layers(model)
    if count <= 0:
        return []
    if unit != "blocks":
        return layers[::-1][:count]
    if backbone is None:
        raise ValueError("block-aware unfreezing needs the Backbone entry")
    chosen, seen, block = [], [], None
    for layer in reversed(layers):
        # A layer whose name names no block (InceptionV3's conv2d_N inside a `mixedN` module)
        # belongs to the block closed by the nearest later named layer, e.g. the concatenation
        # `mixedN`.
        block = backbone.block_of(layer.name) or block or layer.name
        if block not in seen:
            if len(seen) == count:
                break
            seen.append(block)
        chosen.append(layer)
    return chosen
