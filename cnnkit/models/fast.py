"""The ``fast`` model: a small BatchNorm CNN built for the most accuracy per CPU second on small images.

Its shape follows the fast CIFAR-10 line (the DAWNBench ResNet-9, hlb-CIFAR10, airbench) scaled
down for a laptop CPU, written fresh in Keras 3:

* a 3x3 stem convolution (``widths[0]`` channels) at full resolution;
* three blocks of ``Conv3x3 -> MaxPool 2 -> BN -> GELU -> Conv3x3 -> BN -> GELU``: pooling right
  after the first convolution of a block makes every later convolution four times cheaper;
* global max pooling and the classifier (added by ``build_model``).

BatchNorm has no scale (``gamma`` fixed at 1, as airbench: the following convolution rescales) and a
low momentum so its moving statistics follow the weights within a short run; ``cnnkit.training.fitting``
also re-estimates them on training batches after the last step, so a model trained for 2 epochs
at batch 512 is right at test time. Convolutions have no bias (BatchNorm's ``beta`` is the bias).

The recipe that goes with it (``cnnkit.config.RECIPES["fast"]``: SGD with Nesterov momentum on a one-cycle
schedule, label smoothing, flip + translate on whole batches, mixed bfloat16 where the CPU has it)
is applied by ``cnnkit.config`` as the defaults of ``--model fast``.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from cnnkit.models.saving import all_layers

from cnnkit.models.zoo import register

# Channel widths of the stem and the three blocks, by name (``--width``). Their speed depends on the
# machine (on a 2-core AVX512-BF16 CPU in bfloat16: about 1,350 / 800 / 560 CIFAR images per second
# of training; on a 2-core AVX2-only CPU in float32, on oneDNN: about 840 / 420 for small / medium,
# bench/results/onednn.json), so a time budget measures it
# (``cnnkit.training.budget``) instead of reading a table.
WIDTHS = {"small": (24, 32, 64, 128), "medium": (32, 48, 96, 192), "large": (32, 64, 128, 256)}
DEFAULT_WIDTH = "medium"

# The epochs a width needs before it beats the next narrower one in the same time (CIFAR-10, one-cycle
# recipe): a wider model learns more per epoch but runs fewer epochs. Measured on CIFAR-10: with a
# 3-minute budget (medium 2.4 epochs) "small" beat "medium"; with 10 minutes on an AVX2-only CPU
# (medium 5.2 epochs, small 10.4 with progressive resizing) small won on both seeds, by 0.7 points
# (1.0 with flip TTA; bench/results/width_avx2.json); with 10 minutes on a bf16 CPU (medium ~9
# epochs) medium won. A time budget picks the widest width whose affordable epochs reach this number.
MIN_EPOCHS = {"small": 0.0, "medium": 8.0, "large": 16.0}

# BatchNorm momentum (Keras convention: moving = momentum * moving + (1 - momentum) * batch).
BN_MOMENTUM = 0.9
ACTIVATION = "relu"  # GELU costs 25-40% of a training step on a CPU for no gain in a short run
LOGIT_SCALE = 0.125


# "dirac": each 3x3 convolution starts as the identity on its first min(inputs, outputs) output
# channels (the others keep the default init), as airbench: at the start a block passes its input on,
# so early steps train a shallow network that deepens as the kernels move away from the identity.
# (The choices are ``cnnkit.config.FastInit``.)


def dirac_(conv: layers.Conv2D) -> None:
    """Set the first ``min(inputs, outputs)`` filters of a built square convolution to the identity."""
    kernel = keras.ops.convert_to_numpy(conv.kernel).copy()
    size, _, inputs, outputs = kernel.shape
    n = min(inputs, outputs)
    kernel[:, :, :, :n] = 0.0
    kernel[size // 2, size // 2, np.arange(n), np.arange(n)] = 1.0
    conv.kernel.assign(kernel)


def _conv_bn(x, filters: int, name: str, pool: bool = False, init: str = "default"):
    conv = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")
    x = conv(x)
    if init == "dirac":
        dirac_(conv)
    if pool:
        x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, scale=False, name=f"{name}_bn")(x)
    return layers.Activation(ACTIVATION, name=f"{name}_act")(x)


# The whitening stem: a frozen 2x2 convolution whose filters are the eigenvectors of the 2x2 pixel
# patches' covariance (each with its negative, so the ReLU after it loses nothing), scaled by
# 1/sqrt(eigenvalue + WHITEN_EPS): airbench's first layer. ``set_whitening`` fits it to the data.
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4
WHITEN_LAYER = "stem_whiten"


PROGRESSIVE_LAYER = "progressive_resize"


@keras.saving.register_keras_serializable(package="cnnkit")
class ProgressiveResize(layers.Layer):
    """In training, images downscaled to ``side`` (set by ``cnnkit.training.progressive``); else unchanged.

    Progressive resizing: the first epochs train at a lower resolution, where every convolution
    costs ``(side / full) ** 2`` as much, and the model ends at the full size. ``fast`` ends in
    global pooling, so its layers take any size. ``side`` is a plain attribute (not a weight): the
    training step is retraced when it changes. At inference, and once training is over
    (``side = None``), the layer passes its input on, so a saved model and its exports see the
    full size.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.side: tuple[int, int] | None = None

    def call(self, inputs, training=None):
        if not training or self.side is None or tuple(inputs.shape[1:3]) == self.side:
            return inputs
        return keras.ops.image.resize(inputs, self.side, interpolation="bilinear", antialias=True)

    def compute_output_shape(self, input_shape):
        return input_shape


def without_progressive(model: keras.Model) -> keras.Model:
    """``model`` without its ``ProgressiveResize`` layer (same weights: the layer has none); itself
    when it has none.

    The layer only acts in training; the model a run saves is written without it, so it is a plain
    Keras model that loads without cnnkit (no custom layer in the file).
    """
    config = model.get_config()
    entry = next((layer for layer in config.get("layers", []) if layer["name"] == PROGRESSIVE_LAYER), None)
    if entry is None:
        return model
    source = entry["inbound_nodes"][0]["args"][0]["config"]["keras_history"]

    def rewire(node):
        if isinstance(node, dict):
            if node.get("class_name") == "__keras_tensor__" and node["config"]["keras_history"][0] == PROGRESSIVE_LAYER:
                return {**node, "config": {**node["config"], "keras_history": list(source)}}
            return {key: rewire(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):  # a loaded model's config holds tuples where a built one has lists
            return type(node)(rewire(value) for value in node)
        return node

    config = rewire({**config, "layers": [layer for layer in config["layers"] if layer is not entry]})
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def fast_body(x, widths: tuple[int, ...] = WIDTHS[DEFAULT_WIDTH], stem: str = "conv", init: str = "default",
              resizable: bool = False):
    """The feature extractor; ``x`` is scaled to [0, 1]. ``init="dirac"``: the blocks' convolutions
    start as the identity (``dirac_``). ``resizable``: a ``ProgressiveResize`` layer first."""
    if resizable:
        x = ProgressiveResize(name=PROGRESSIVE_LAYER)(x)
    x = layers.Rescaling(2.0, offset=-1.0, name="center")(x)  # [0, 1] -> [-1, 1]
    if stem == "whiten":
        channels = 2 * WHITEN_KERNEL * WHITEN_KERNEL * x.shape[-1]
        x = layers.Conv2D(channels, WHITEN_KERNEL, padding="same", use_bias=False, trainable=False,
                          name=WHITEN_LAYER)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, scale=False, name="stem_bn")(x)
        x = layers.Activation(ACTIVATION, name="stem_act")(x)
    else:
        x = _conv_bn(x, widths[0], "stem")
    for index, filters in enumerate(widths[1:], start=1):
        x = _conv_bn(x, filters, f"block{index}a", pool=True, init=init)
        x = _conv_bn(x, filters, f"block{index}b", init=init)
    x = layers.GlobalMaxPooling2D(name="global_pool")(x)
    # Scaled-down logits (ResNet-9's 0.125) keep the softmax soft while the rate is high.
    return layers.Rescaling(LOGIT_SCALE, name="logit_scale")(x)


def set_whitening(model, images: np.ndarray, max_images: int = 2_000) -> bool:
    """Fit the whitening stem of a ``fast`` model to uint8 ``images`` (N, H, W, C); False if it has none.

    The filters whiten the 2x2 patches of the images as the model sees them ([-1, 1]): patches times
    the filters have unit variance along every principal direction.
    """
    layer = next((l for l in all_layers(model) if l.name == WHITEN_LAYER), None)
    if layer is None:
        return False
    x = np.asarray(images[:max_images], dtype=np.float32) / 127.5 - 1.0
    k = WHITEN_KERNEL
    n, h, w, c = x.shape
    patches = np.stack([x[:, i : h - k + 1 + i, j : w - k + 1 + j] for i in range(k) for j in range(k)], axis=3)
    patches = patches.reshape(-1, k * k * c)  # (pixels, i*k+j major, then channel) = kernel (k, k, c) order
    patches = patches - patches.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh((patches.T @ patches).astype(np.float64) / len(patches))
    filters = eigenvectors / np.sqrt(eigenvalues + WHITEN_EPS)  # one per column
    filters = np.concatenate([filters, -filters], axis=1).reshape(k, k, c, 2 * k * k * c)
    layer.kernel.assign(filters.astype("float32"))
    return True


@register("fast", (32, 32), "cnnkit's fast BatchNorm CNN (stem 32, blocks 48-96-192) with its one-cycle recipe; "
          "the default for images up to 64 px", options=("width", "stem", "init", "resizable"))
def fast_model(x, num_classes: int, width: str = "auto", stem: str = "conv", init: str = "default",
               resizable: bool = False):
    return fast_body(x, WIDTHS[DEFAULT_WIDTH if width == "auto" else width], stem, init, resizable)
