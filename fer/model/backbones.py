"""The backbone registry: everything fer-study needs to know about a `keras.applications` model.

Each entry says how to build the backbone, which input scaling it was trained with (done inside the
model, see `fer.model.layers.Preprocess`), its native input size, the layer Grad-CAM should look at,
and how to count its "blocks" for block-aware unfreezing. Adding a backbone is one `register(...)`
call.

Why blocks: the published method unfreezes "the last 30 layers", which is 9% of DenseNet121's
parameters but 68% of MobileNetV2's. `unfreeze_unit=blocks` counts whole architectural blocks
instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from fer.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    constructor: (
        str | Callable
    )  # attribute of keras.applications, or a function with the same signature
    preprocess: str  # mode of fer.model.layers.Preprocess: raw | caffe | tf | torch
    native_size: int
    min_size: int
    gradcam_layer: str  # last spatial activation, the usual Grad-CAM target
    block_regex: str  # a layer-name regex whose first group names the layer's block
    kwargs: dict = dataclasses.field(default_factory=dict)

    def build(self, input_tensor, weights) -> keras.Model:  # noqa: F821
        """Build the headless backbone on `input_tensor` so its layers sit flat in the full model.

        Flat (not nested as one layer) so Grad-CAM can reach inner activations
        (docs/pitfalls.md#flat-backbone).
        """
        import keras

        ctor = self.constructor
        if isinstance(ctor, str):
            ctor = getattr(keras.applications, ctor)
        return ctor(include_top=False, weights=weights, input_tensor=input_tensor, **self.kwargs)

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer's name names, or None: such a layer belongs to the next named block
        after it (see `fer.model.build.set_stage`), so a module's inner layers and its closing layer
        stay together."""
        m = re.match(self.block_regex, layer_name)
        return m.group(1) if m else None


def small_cnn(include_top=False, weights=None, input_tensor=None):
    """A four-block CNN trained from scratch: the backbone of smoke studies, demos and fast tests.

    Why it exists: a keras.applications model with random weights cannot learn in the head stage
    (its frozen BatchNormalization layers hold initial statistics, and activations vanish through
    ~100 random layers), so a demo without downloadable ImageNet weights would stay at chance. Four
    random ReLU convolutions keep informative features, so both stages learn within seconds on CPU.
    Each convolution is followed by BatchNormalization: frozen at its initial statistics in the head
    stage it is a near-identity (the head still learns on random features), trained in stage 2
    (weights=none) it lets a high learning rate converge and makes the features robust to scattered
    pixel changes: on the demo data the deletion test then tells Grad-CAM from random removal, which
    it cannot without BN (docs/benchmarks.md).
    """
    import keras

    if weights == "imagenet":
        raise UserError(
            "smallcnn has no ImageNet weights: use --set weights=none (or a smallcnn weights file)"
        )
    del include_top  # headless by construction
    x = input_tensor
    for i, filters in enumerate((32, 64, 96, 128), start=1):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            kernel_initializer="he_normal",
            use_bias=False,
            name=f"smallcnn_block{i}_conv",
        )(x)
        x = keras.layers.BatchNormalization(name=f"smallcnn_block{i}_bn")(x)
        x = keras.layers.Activation("relu", name=f"smallcnn_block{i}_relu")(x)
        if i < 4:
            x = keras.layers.MaxPooling2D(name=f"smallcnn_block{i}_pool")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name="smallcnn")


def mini_xception(include_top=False, weights=None, input_tensor=None):
    """A small residual CNN with BatchNormalization and depthwise-separable convolutions, trained
    from scratch.

    After the mini-Xception FER model (Arriaga et al. 2017: two plain convolutions, then residual
    modules of two separable convolutions and a strided max-pool beside a strided 1x1 shortcut),
    with three modules instead of four, so its last feature map is 6x6 at 48 px: fine enough for
    Grad-CAM to tell the mouth from the eyes. The demo's second backbone: unlike a
    keras.applications model from random weights, it has few enough layers to learn from a few
    hundred images within seconds. Its BN layers train (weights=none, see
    fer.model.build.set_stage), so give it `unfreeze_layers` >= its layer count (about 50) and few
    head epochs.
    """
    import keras

    if weights == "imagenet":
        raise UserError(
            "minixception has no ImageNet weights: use --set weights=none (or a weights file)"
        )
    del include_top
    layers = keras.layers
    x = input_tensor
    for i, filters in enumerate((16, 16), start=1):
        x = layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"minixception_entry_conv{i}"
        )(x)
        x = layers.BatchNormalization(name=f"minixception_entry_bn{i}")(x)
        x = layers.Activation("relu", name=f"minixception_entry_relu{i}")(x)
    for i, filters in enumerate((32, 64, 128), start=1):
        name = f"minixception_block{i}"
        shortcut = layers.Conv2D(
            filters, 1, strides=2, padding="same", use_bias=False, name=f"{name}_short"
        )(x)
        shortcut = layers.BatchNormalization(name=f"{name}_short_bn")(shortcut)
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep1")(
            x
        )
        x = layers.BatchNormalization(name=f"{name}_bn1")(x)
        x = layers.Activation("relu", name=f"{name}_relu1")(x)
        x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_sep2")(
            x
        )
        x = layers.BatchNormalization(name=f"{name}_bn2")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_pool")(x)
        x = layers.Add(name=f"{name}_add")([x, shortcut])
        x = layers.Activation("relu", name=f"{name}_out")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name="minixception")


def vgg_cnn(include_top=False, weights=None, input_tensor=None):
    """A VGG-style CNN for small grey faces, trained from scratch: four blocks of two 3x3
    convolutions (32, 64, 128, 256 filters), each followed by BatchNormalization and ReLU, and a
    2x2 max-pool after every block but the last.

    Why: the FER2013 reference study's smallcnn (one convolution per block, 0.22 M parameters)
    plateaued on PublicTest over its last epochs after reduce-LR had lowered its rate twice, which
    is a shortage of capacity, not of epochs (docs/reference.md). Two convolutions per block is
    what the FER literature's plain CNNs at 48 px use. The last feature map is 6x6 at 48 px, the
    same as minixception's, so Grad-CAM can still tell the mouth from the eyes. Dropout is the
    head's (`dropout`); BN trains with the network (weights=none, see fer.model.build.set_stage),
    so give it `unfreeze_layers` >= its layer count (about 30) and no head stage. Its epoch time
    against smallcnn and minixception is in docs/benchmarks.md.
    """
    import keras

    if weights == "imagenet":
        raise UserError(
            "vggcnn has no ImageNet weights: use --set weights=none, or --weights PATH for a "
            "vggcnn weights file"
        )
    del include_top
    layers = keras.layers
    x = input_tensor
    for i, filters in enumerate((32, 64, 128, 256), start=1):
        for j in (1, 2):
            name = f"vggcnn_block{i}_conv{j}"
            x = layers.Conv2D(
                filters,
                3,
                padding="same",
                kernel_initializer="he_normal",
                use_bias=False,
                name=name,
            )(x)
            x = layers.BatchNormalization(name=f"vggcnn_block{i}_bn{j}")(x)
            x = layers.Activation("relu", name=f"vggcnn_block{i}_relu{j}")(x)
        if i < 4:
            x = layers.MaxPooling2D(name=f"vggcnn_block{i}_pool")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name="vggcnn")


BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})") from None


register(
    Backbone(
        "efficientnetb1",
        "EfficientNetB1",
        "raw",
        240,
        32,
        "top_activation",
        r"^(block\d+[a-z]|stem|top)_",
    )
)
register(
    Backbone(
        "resnet50",
        "ResNet50",
        "caffe",
        224,
        32,
        "conv5_block3_out",
        r"^(conv\d_block\d+|conv1|pool1)_",
    )
)
register(
    Backbone("inceptionv3", "InceptionV3", "tf", 299, 75, "mixed10", r"^(mixed\d+)$")
)  # mixed9_1 is inside mixed10: unnamed layers join the next named block
register(
    Backbone(
        "mobilenetv2",
        "MobileNetV2",
        "tf",
        224,
        32,
        "out_relu",
        r"^(block_\d+|expanded_conv|Conv1|bn_Conv1)",
    )
)  # Conv_1, Conv_1_bn, out_relu: one top block
register(
    Backbone(
        "densenet121", "DenseNet121", "torch", 224, 32, "relu", r"^(conv\d_block\d+|pool\d|conv1)_"
    )
)  # the final bn, relu: one top block
# Not part of the published comparison; a small, fast model whose ImageNet file (Keras's
# mobilenet_2_5_224_tf_no_top.h5) is small enough to pass around offline.
register(
    Backbone(
        "mobilenet025",
        "MobileNet",
        "tf",
        224,
        32,
        "conv_pw_13_relu",
        r"^(conv_(?:dw_|pw_)?\d+|conv1)",
        kwargs={"alpha": 0.25},
    )
)
register(
    Backbone("smallcnn", small_cnn, "tf", 64, 16, "smallcnn_block4_relu", r"^(smallcnn_block\d+)_")
)
register(
    Backbone(
        "minixception",
        mini_xception,
        "tf",
        48,
        16,
        "minixception_block3_out",
        r"^(minixception_(?:entry|block\d+))_",
    )
)
register(Backbone("vggcnn", vgg_cnn, "tf", 48, 16, "vggcnn_block4_relu2", r"^(vggcnn_block\d+)_"))
