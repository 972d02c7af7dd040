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

from cnnkit.errors import ModelError

LOSS = "sparse_categorical_crossentropy"


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about an architecture.

    Attributes:
        name: the name users type (``--model``); never changes after release.
        body: builds the layers between the scaled input and the classifier head.
        default_image_size: (height, width) used when the user gives none.
        description: one line for ``--help`` and error messages.
    """

    name: str
    body: Callable[..., keras.KerasTensor]
    default_image_size: tuple[int, int]
    description: str


_ARCHITECTURES: dict[str, ModelSpec] = {}


def register(name: str, default_image_size: tuple[int, int], description: str):
    """Decorator adding a body builder ``fn(x, num_classes, **options) -> features`` to the zoo."""

    def wrap(fn: Callable[..., keras.KerasTensor]) -> Callable[..., keras.KerasTensor]:
        _ARCHITECTURES[name] = ModelSpec(name, fn, default_image_size, description)
        return fn

    return wrap


def available_models() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(_ARCHITECTURES)


def get_spec(name: str) -> ModelSpec:
    """The spec of ``name``; an unknown name lists the valid ones and suggests the closest."""
    if name not in _ARCHITECTURES:
        near = difflib.get_close_matches(name, list(_ARCHITECTURES), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ModelError(
            f"Unknown model '{name}'. Available: {', '.join(available_models())}.{hint} Received: model={name!r}"
        )
    return _ARCHITECTURES[name]


def augmentation_layers(augment: str, seed: int | None = None) -> list[keras.layers.Layer]:
    """The layers of an augmentation preset; they act only in training (identity at inference).

    ``standard``: horizontal flip, rotation up to +-18 degrees (Keras's factor 0.05 of a full
    turn), zoom +-10% and translation +-10% of the size, edges filled by reflection.
    """
    if augment == "none":
        return []
    if augment == "standard":
        return [
            layers.RandomFlip("horizontal", seed=seed, name="aug_flip"),
            layers.RandomRotation(0.05, fill_mode="reflect", seed=seed, name="aug_rotation"),
            layers.RandomZoom(0.1, fill_mode="reflect", seed=seed, name="aug_zoom"),
            layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed, name="aug_translation"),
        ]
    raise ModelError(f"Unknown augmentation preset '{augment}'. Available: none, standard. Received: augment={augment!r}")


def build_model(
    name: str,
    num_classes: int,
    image_size: tuple[int, int] | None = None,
    channels: int = 3,
    augment: str = "none",
    seed: int | None = None,
) -> keras.Model:
    """Build an uncompiled classifier from the zoo.

    Args:
        name: a registered architecture (see ``available_models()``).
        num_classes: number of output classes (>= 2).
        image_size: (height, width) of the input; ``None`` uses the architecture's default.
        channels: 3 for RGB, 1 for grayscale.
        augment: augmentation preset placed after the input ("none" or "standard").
        seed: seed of the augmentation layers.

    Returns:
        A ``keras.Model`` mapping raw 0-255 pixels (batch, height, width, channels) to class
        probabilities (batch, num_classes).

    Example:
        >>> model = build_model("simple", num_classes=10, image_size=(32, 32))
    """
    spec = get_spec(name)
    if num_classes < 2:
        raise ModelError(f"A classifier needs at least 2 classes. Received: num_classes={num_classes}")
    height, width = image_size or spec.default_image_size
    inputs = keras.Input(shape=(height, width, channels), name="image")
    x = inputs
    for layer in augmentation_layers(augment, seed):
        x = layer(x)
    x = layers.Rescaling(1.0 / 255, name="rescale_0_255")(x)
    x = spec.body(x, num_classes=num_classes)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)
