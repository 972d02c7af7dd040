"""The tutorials' from-scratch CNNs: ``simple`` and ``vgg``."""

from __future__ import annotations

from keras import layers

from cnnkit.models.zoo import register


@register("simple", (32, 32), "the tutorials' 3-block Conv/MaxPool CNN (32-64-128) with a Dense(128) + Dropout head")
def simple(x, num_classes: int):
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    return layers.Dropout(0.5)(x)


@register("vgg", (32, 32), "the tutorials' BatchNorm double-conv CNN (32-64-128, dropout 0.25/0.5)")
def vgg(x, num_classes: int):
    for filters in (32, 64, 128):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    return layers.Dropout(0.5)(x)
