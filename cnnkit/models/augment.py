"""Augmentation presets: named lists of Keras preprocessing layers placed right after the input.

They act on raw 0-255 pixels, only in training (identity at inference), so a saved model predicts
the same with or without them. Each preset is plain data (``AUGMENT_PRESETS``), stored in full in
run.json, and documented here and in the README:

=========  ==========================================================================================
none       nothing
light      horizontal flip; translation +-5%
standard   horizontal flip; rotation +-18 deg; zoom +-10%; translation +-10% (reflect-filled edges)
strong     standard's, wider (rotation +-36 deg, zoom +-20% = random crops and zoom-outs,
           translation +-15%), plus contrast +-30% and brightness +-20%
screens    screenshots and documents: no flips or rotations (text and layout have a direction);
           zoom-in up to 15% (a random crop scaled back) or out 5%, translation +-5%, brightness
           and contrast +-20%
flip-      the fast recipe's (``--model fast``): horizontal flip, alternating per epoch (each image
translate  is seen mirrored every other epoch) and translation by up to 1/16 of the size (2 px at
           32 px, reflect-padded), done on whole uint8 batches by the loader
           (``cnnkit.data.batches``), not by layers: no cost inside the model, and nothing in it
=========  ==========================================================================================

Rotation factors are fractions of a full turn, as in Keras (0.05 = 18 degrees).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

# (layer class name, keyword arguments); "name" is the layer name in the model.
AUGMENT_PRESETS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "none": [],
    "light": [
        ("RandomFlip", {"mode": "horizontal", "name": "aug_flip"}),
        ("RandomTranslation", {"height_factor": 0.05, "width_factor": 0.05, "fill_mode": "reflect",
                               "name": "aug_translation"}),
    ],
    "standard": [
        ("RandomFlip", {"mode": "horizontal", "name": "aug_flip"}),
        ("RandomRotation", {"factor": 0.05, "fill_mode": "reflect", "name": "aug_rotation"}),
        ("RandomZoom", {"height_factor": 0.1, "fill_mode": "reflect", "name": "aug_zoom"}),
        ("RandomTranslation", {"height_factor": 0.1, "width_factor": 0.1, "fill_mode": "reflect",
                               "name": "aug_translation"}),
    ],
    "strong": [
        ("RandomFlip", {"mode": "horizontal", "name": "aug_flip"}),
        ("RandomRotation", {"factor": 0.1, "fill_mode": "reflect", "name": "aug_rotation"}),
        ("RandomZoom", {"height_factor": 0.2, "fill_mode": "reflect", "name": "aug_zoom"}),
        ("RandomTranslation", {"height_factor": 0.15, "width_factor": 0.15, "fill_mode": "reflect",
                               "name": "aug_translation"}),
        ("RandomContrast", {"factor": 0.3, "value_range": (0, 255), "name": "aug_contrast"}),
        ("RandomBrightness", {"factor": 0.2, "value_range": (0, 255), "name": "aug_brightness"}),
    ],
    "screens": [
        # Keras's RandomZoom: negative factors zoom in (crop), positive zoom out.
        ("RandomZoom", {"height_factor": (-0.15, 0.05), "fill_mode": "constant", "fill_value": 255.0,
                        "name": "aug_zoom"}),
        ("RandomTranslation", {"height_factor": 0.05, "width_factor": 0.05, "fill_mode": "constant",
                               "fill_value": 255.0, "name": "aug_translation"}),
        ("RandomBrightness", {"factor": 0.2, "value_range": (0, 255), "name": "aug_brightness"}),
        ("RandomContrast", {"factor": 0.2, "value_range": (0, 255), "name": "aug_contrast"}),
    ],
}


# Presets applied by the loader to whole batches (``cnnkit.data.batches.BatchAugment``), not layers.
BATCH_PRESETS: dict[str, dict[str, Any]] = {
    "flip-translate": {"flip": "alternating", "translate": 1 / 16, "fill_mode": "reflect"},
}


def augment_config(augment: str) -> list[dict[str, Any]]:
    """The preset as JSON-ready data, as stored in run.json: ``[{"layer": ..., **kwargs}, ...]``."""
    if augment in BATCH_PRESETS:
        return [{"loader": augment, **BATCH_PRESETS[augment]}]
    return [{"layer": cls, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
            for cls, kwargs in _preset(augment)]


def trains_with_flips(augment: str) -> bool:
    """True when the preset mirrors images (then flip test-time augmentation is reported too)."""
    return any(step.get("layer") == "RandomFlip" or step.get("flip") not in (None, "none")
               for step in augment_config(augment))


def augmentation_layers(augment: str, seed: int | None = None) -> list[keras.layers.Layer]:
    """The layers of preset ``augment``; they act only in training (identity at inference)."""
    if augment in BATCH_PRESETS:
        return []  # done by the loader
    return [getattr(layers, cls)(**kwargs, seed=seed) for cls, kwargs in _preset(augment)]


def _preset(augment: str) -> list[tuple[str, dict[str, Any]]]:
    if augment not in AUGMENT_PRESETS:
        from cnnkit.errors import ModelError

        names = [*AUGMENT_PRESETS, *BATCH_PRESETS]
        raise ModelError(f"Unknown augmentation preset '{augment}'. Available: {', '.join(names)}. "
                         f"Received: augment={augment!r}")
    return AUGMENT_PRESETS[augment]


def final_tta(tta: str, augment: str) -> str | None:
    """The test-time views of a run's final metrics: ``tta`` ("auto": flip when ``augment`` flips)."""
    if tta == "auto":
        return "flip" if trains_with_flips(augment) else None
    return None if tta == "none" else tta
