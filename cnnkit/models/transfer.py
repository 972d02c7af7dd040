"""Pre-trained backbones from ``keras.applications``: ``mobilenetv2``, ``efficientnetb0``, ``resnet50``.

Registered through the same ``@register`` factory as the from-scratch CNNs. Every model still takes
raw 0-255 pixels: the backbone's own ``preprocess_input`` is a layer inside it, so training,
evaluation and serving cannot forget it.

    image (0-255) -> augmentation -> [gray -> RGB] -> [upscale] -> backbone preprocessing
                  -> backbone (pre-trained: BatchNorm in inference mode) -> GlobalAveragePooling2D
                  -> [Dense(head_width, relu)] -> Dropout -> Dense(num_classes, softmax, float32)

* mobilenetv2: ``x / 127.5 - 1`` (``Rescaling(1/127.5, offset=-1)``), as ``mobilenet_v2.preprocess_input``.
* efficientnetb0: identity here; Keras's EfficientNet scales and normalises inside the backbone
  (``efficientnet.preprocess_input`` is the identity).
* resnet50: caffe style, RGB -> BGR then minus the ImageNet mean, as ``resnet50.preprocess_input``;
  done by a frozen ``Dense(3)`` holding a permutation matrix and the negative mean, so the model
  needs no custom layer to load (``keras.saving.load_model`` opens it without cnnkit).

A pre-trained backbone is called with ``training=False``, so its BatchNorm layers keep their
moving statistics even when unfrozen for fine-tuning (Keras's transfer-learning guide): updating
them on a small dataset wrecks what the pre-trained weights learnt. With ``weights="none"`` the
backbone trains from scratch and its BatchNorm layers work as usual (batch statistics in training).

Weights: "imagenet" goes through keras.applications' download; "none" is random initialisation;
a path loads a ``.weights.h5`` of the backbone, or takes the backbone weights out of a ``.keras``
file (a ``keras.applications`` model saved with ``include_top=False``, or a cnnkit ``model.keras``
/ run directory whose ``backbone`` layer is reused), which lets a firewalled user, and the tests,
work offline. Convolution weights do not depend on the input size, so a backbone trained at 32x32
loads into one at 96x96.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers

from cnnkit.errors import ModelError
from cnnkit.models.zoo import register

# Keras refuses inputs below 32x32 for all three (``imagenet_utils.obtain_input_shape(min_size=32)``).
MIN_IMAGE_SIZE = 32
BACKBONE_LAYER = "backbone"
# keras.applications' BatchNorm momentum is 0.999 (tuned for ImageNet's 1.2 M images): from scratch
# on a small folder its moving statistics are still far from the batch statistics after a few
# hundred steps, and validation sits at chance while training accuracy climbs (measured: MobileNetV2,
# 4,000 CIFAR images at 32x32, 5 epochs: val 20% = chance on 5 classes, train 77%). 0.9 is Keras's
# own BatchNormalization default.
SCRATCH_BN_MOMENTUM = 0.9
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications.imagenet_utils, mode="caffe"


def _prepare(x, channels: int, upscale_size: int | None):
    """Grayscale -> 3 channels and upscaling to the backbone's minimum (or ``upscale_size``)."""
    if channels == 1:
        # Dense(3) with a ones kernel copies the gray channel to R, G and B (exact, built-in layer).
        x = layers.Dense(3, use_bias=False, kernel_initializer="ones", trainable=False, dtype="float32",
                         name="gray_to_rgb")(x)
    height, width = x.shape[1], x.shape[2]
    target = max(MIN_IMAGE_SIZE, int(upscale_size or 0))
    if height < target or width < target:
        x = layers.Resizing(max(height, target), max(width, target), interpolation="bilinear", name="upscale")(x)
    return x


def _mobilenet_preprocess(x, channels: int = 3, upscale_size: int | None = None):
    x = _prepare(x, channels, upscale_size)
    return layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32", name="preprocess_mobilenet_v2")(x)


def _efficientnet_preprocess(x, channels: int = 3, upscale_size: int | None = None):
    return _prepare(x, channels, upscale_size)  # the backbone rescales and normalises itself


def _resnet_preprocess(x, channels: int = 3, upscale_size: int | None = None):
    x = _prepare(x, channels, upscale_size)
    caffe = layers.Dense(3, trainable=False, dtype="float32", name="preprocess_caffe_bgr")
    x = caffe(x)
    permutation = np.eye(3, dtype="float32")[:, ::-1]  # out[..., j] = in[..., 2 - j]: RGB -> BGR
    caffe.set_weights([permutation, -np.array(CAFFE_MEAN_BGR, dtype="float32")])
    return x


def _head(features, num_classes: int, head_width: int, dropout: float):
    x = layers.GlobalAveragePooling2D(name="head_pool")(features)
    if head_width:
        x = layers.Dense(head_width, activation="relu", name="head_dense")(x)
    return layers.Dropout(dropout, name="head_dropout")(x)


def _backbone(application, x, weights: str | None):
    """Instantiate ``application`` without its top for ``x``'s shape and load ``weights`` into it."""
    weights = "imagenet" if weights is None else weights
    shape = tuple(int(d) for d in x.shape[1:])
    if weights == "imagenet":
        try:
            net = application(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # urllib/HTTP/SSL/OS errors: Keras does not narrow them
            raise ModelError(
                f"Could not download the ImageNet weights of {application.__name__} ({type(exc).__name__}: {exc}). "
                "Offline, pass --weights PATH (a .weights.h5 or .keras backbone saved elsewhere) or train from "
                "random init with --weights none. Received: weights='imagenet'"
            ) from exc
    else:
        net = application(include_top=False, weights=None, input_shape=shape)
        if weights != "none":
            load_backbone_weights(net, weights)
            x = _efficientnet_imagenet_scale(net, x)
    return attach_backbone(net, x, pretrained=weights != "none")


def attach_backbone(net: keras.Model, x, pretrained: bool):
    """Call ``net`` on ``x`` as the model's ``backbone`` layer: in inference mode when ``pretrained``.

    A pre-trained backbone's BatchNorm keeps its moving statistics (called with ``training=False``),
    frozen or fine-tuned; a random one (``weights="none"``) trains them, at momentum 0.9.
    """
    net.name = BACKBONE_LAYER
    net.trainable = True
    if not pretrained:  # trained from scratch: BatchNorm must learn its statistics as usual
        for layer in net.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = SCRATCH_BN_MOMENTUM
        return net(x)
    return net(x, training=False)


IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)  # keras.applications.efficientnet
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def _efficientnet_imagenet_scale(net: keras.Model, x):
    """Restore the division by sqrt(std) that Keras's EfficientNet has only for ``weights="imagenet"``.

    Keras's ImageNet EfficientNet computes ``((x/255 - mean) / std) / sqrt(std)`` (its comment:
    tensorflow#49930) with an extra Rescaling layer it builds only when ``weights == "imagenet"``.
    Built with ``weights=None`` and given ImageNet statistics from a file, the backbone lacks it, so
    ``x' = 255*mean + (x - 255*mean) / sqrt(std)`` is applied before it: the same result. Applied
    only when the loaded Normalization holds ImageNet statistics (a random-init backbone has 0/1).
    """
    norm = next((layer for layer in net.layers if isinstance(layer, layers.Normalization)), None)
    if norm is None or not norm.get_weights():
        return x
    variance = np.asarray(norm.get_weights()[1], dtype="float64").reshape(-1)
    if variance.shape != (3,) or not np.allclose(variance, np.square(IMAGENET_STDDEV_RGB), rtol=1e-3):
        return x
    root = np.sqrt(np.array(IMAGENET_STDDEV_RGB))
    mean255 = 255.0 * np.array(IMAGENET_MEAN_RGB)
    return layers.Rescaling((1.0 / root).tolist(), offset=(mean255 * (1.0 - 1.0 / root)).tolist(), dtype="float32",
                            name="preprocess_efficientnet_imagenet")(x)


def load_backbone_weights(net: keras.Model, path: str | Path) -> None:
    """Load a ``.weights.h5`` file, a ``.keras`` backbone, or a cnnkit run's backbone into ``net``.

    Raises:
        ModelError: missing file, unknown extension, or weights of another architecture (the
            message names the file and what was found).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.exists():
        raise ModelError(f"--weights file '{path}' does not exist. Pass 'imagenet', 'none', a .weights.h5 file, "
                         f"a .keras backbone or a cnnkit run directory. Received: weights='{path}'")
    if path.name.endswith(".weights.h5") or path.suffix == ".h5":
        try:
            with warnings.catch_warnings():  # Keras warns once per layer it cannot match before raising
                warnings.simplefilter("ignore", UserWarning)
                net.load_weights(path)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise ModelError(f"--weights '{path}' does not fit the {net.name} backbone ({reason}). It must be saved "
                             "from the same keras.applications model with include_top=False (or pass a cnnkit run "
                             f"trained with this backbone). Received: weights='{path}'") from exc
        return
    if path.suffix != ".keras":
        raise ModelError(f"--weights '{path}' is neither a .weights.h5 nor a .keras file. Received: weights='{path}'")
    try:
        source = keras.saving.load_model(path, compile=False)
    except Exception as exc:
        raise ModelError(f"Cannot load --weights '{path}' as a Keras model: {exc}") from exc
    names = [layer.name for layer in source.layers]
    if BACKBONE_LAYER in names:  # a cnnkit model: reuse its backbone, drop its head
        source = source.get_layer(BACKBONE_LAYER)
    _copy_weights(source, net, path)


def _copy_weights(source: keras.Model, net: keras.Model, path: Path) -> None:
    src, dst = source.get_weights(), net.get_weights()
    if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src, dst)):
        last = source.layers[-1]
        if isinstance(last, layers.Dense) or "predictions" in last.name:
            hint = (f"its last layer '{last.name}' is a classifier head with {last.units if hasattr(last, 'units') else '?'} "
                    "outputs: save the backbone with include_top=False, or pass a cnnkit run trained with this backbone")
        else:
            hint = f"it holds {len(src)} weight arrays where this backbone has {len(dst)}: it is another architecture"
        raise ModelError(f"--weights '{path}' does not fit the {net.name} backbone: {hint}. "
                         f"Received: weights='{path}'")
    net.set_weights(src)


def _backbone_body(application):
    def body(x, num_classes: int, weights: str | None = None, head_width: int = 0, dropout: float = 0.2):
        return _head(_backbone(application, x, weights), num_classes, head_width, dropout)

    return body


register("mobilenetv2", (224, 224), "MobileNetV2 (ImageNet, 2.3 M params), inputs scaled to [-1, 1] inside",
         preprocess=_mobilenet_preprocess, is_backbone=True)(_backbone_body(keras.applications.MobileNetV2))
register("efficientnetb0", (224, 224), "EfficientNetB0 (ImageNet, 4.0 M params), its own rescaling inside",
         preprocess=_efficientnet_preprocess, is_backbone=True)(_backbone_body(keras.applications.EfficientNetB0))
register("resnet50", (224, 224), "ResNet50 (ImageNet, 23.6 M params), caffe-style BGR mean subtraction inside",
         preprocess=_resnet_preprocess, is_backbone=True)(_backbone_body(keras.applications.ResNet50))


def get_backbone(model: keras.Model) -> keras.Model | None:
    """The nested backbone of a cnnkit transfer model, or None for a from-scratch CNN."""
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        return None


def set_backbone_frozen(model: keras.Model) -> int:
    """Phase 1: freeze the whole backbone (only the head trains). Returns the frozen layer count."""
    backbone = get_backbone(model)
    if backbone is None:
        raise ModelError(f"Model '{model.name}' has no pre-trained backbone to freeze.")
    backbone.trainable = False
    return len(backbone.layers)


def unfreeze_top(model: keras.Model, fine_tune_layers: int | str) -> list[keras.layers.Layer]:
    """Phase 2: unfreeze the backbone's last ``fine_tune_layers`` layers ("all" = every one).

    BatchNormalization layers stay frozen: the backbone is called with ``training=False`` so
    they are in inference mode anyway, and keeping their scale/offset fixed is Keras's advice for
    small datasets. Returns the layers left trainable, first to last.
    """
    backbone = get_backbone(model)
    if backbone is None:
        raise ModelError(f"Model '{model.name}' has no pre-trained backbone to fine-tune.")
    backbone.trainable = True
    candidates = [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
    count = len(candidates) if fine_tune_layers == "all" else min(int(fine_tune_layers), len(candidates))
    unfrozen = []
    for index, layer in enumerate(candidates):
        keep = index >= len(candidates) - count and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = keep
        if keep:
            unfrozen.append(layer)
    return unfrozen
