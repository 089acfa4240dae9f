"""The models of the frozen-feature caches (fer/train/feature_cache.py), made of the trial model's
own layers: what computes the cached features (the frozen part) and what trains on them (the head,
or the unfrozen tail and the head).

Every model here shares its layer objects with the full trial model, so training the head-only or
tail model trains the full model; the stage-2 cut can fall inside a residual block, where more
than one tensor crosses it.
"""

from __future__ import annotations

import keras

from fer.model.backbones import get_backbone
from fer.model.build import HEAD_PREFIX, backbone_layers, last_backbone_layers


def head_extractor(model: keras.Model) -> keras.Model:
    """The trial model's own layers from the (augmented) image to `head_pool`: preprocess ->
    backbone -> GAP."""
    return keras.Model(
        model.get_layer("preprocess").input,
        model.get_layer("head_pool").output,
        name="head_features",
    )


def head_model(model: keras.Model) -> keras.Model:
    """A model from pooled features to class probabilities made of the SAME head layer objects as
    `model`, so training it trains the full model's head."""
    channels = model.get_layer("head_pool").output.shape[-1]
    inputs = keras.Input((channels,), name="features")
    x = model.get_layer("head_dense")(inputs)
    x = model.get_layer("head_dropout")(x)
    return keras.Model(inputs, model.get_layer("head_out")(x), name="head_only")


def tail_features_model(model: keras.Model, tail_layers: int) -> keras.Model:
    """From the tensors crossing the stage-2 cut to the pooled head features: the frozen tail, so
    the head features can be computed from the stage-2 cache."""
    crossing, _ = crossing_tensors(model, tail_layers)
    return keras.Model(crossing, model.get_layer("head_pool").output, name="tail_features")


def split_at_tail(model: keras.Model, tail_layers: int) -> tuple[keras.Model, keras.Model, str]:
    """Cut `model` before its last `tail_layers` backbone layers: (prefix, tail, cut name).

    `prefix` maps the (augmented) image to the tensors that cross the cut; `tail` maps those
    tensors to the class probabilities with the SAME layer objects as `model` (training it trains
    the full model).
    """
    crossing, cut = crossing_tensors(model, tail_layers)
    prefix = keras.Model(model.get_layer("preprocess").input, crossing, name="frozen_prefix")
    return prefix, keras.Model(crossing, model.output, name="trainable_tail"), cut


def crossing_tensors(model: keras.Model, tail_layers: int) -> tuple[list, str]:
    """The tensors entering the last `tail_layers` backbone layers (and the head) from before them,
    and the name of the first tail layer. Found by walking back from the output through the graph
    until a layer outside the tail and the head: more than one when the cut falls inside a
    residual block."""
    layers = backbone_layers(model)
    tail = layers[len(layers) - tail_layers :] if tail_layers > 0 else []
    inside = {id(layer) for layer in tail} | {
        id(layer) for layer in model.layers if layer.name.startswith(HEAD_PREFIX)
    }
    crossing, stack, seen = [], [model.output], set()
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        operation, node_index, _ = tensor._keras_history
        if id(operation) not in inside:
            crossing.append(tensor)
            continue
        stack.extend(reversed(operation._inbound_nodes[node_index].input_tensors))
    return crossing, (tail[0].name if tail else "head")


def tail_layer_count(model: keras.Model, config: dict) -> int:
    """Backbone layers after the stage-2 cut: the last `finetune_cache_units` (or
    `unfreeze_layers`) units."""
    units = config["finetune_cache_units"] or config["unfreeze_layers"]
    return len(
        last_backbone_layers(
            model, units, config["unfreeze_unit"], get_backbone(config["backbone"])
        )
    )
