"""Model files that carry their own metadata: class names, image size, colour and resize mode.

A ``model.keras`` written here is an ordinary Keras archive (``keras.saving.load_model`` opens it)
with one extra member, ``cnnkit.json``, so a model file moved alone to another folder still knows
its class names and how its images must be decoded. Files are written to a temporary name and
renamed, so a crash never leaves half a model.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import keras

from cnnkit._progress import warn
from cnnkit.errors import ModelError
from cnnkit.rundir import META_MEMBER, ModelMeta, atomic_path, model_path, read_model_metadata


def as_float32(model: keras.Model) -> keras.Model:
    """``model`` with every layer computing in float32 (same weights); itself when it already does.

    Mixed precision is a training speed-up: a saved model trained in mixed_bfloat16 would compute in
    bfloat16 wherever it is loaded, slowly on CPUs without bfloat16 instructions, and ONNX/TFLite
    exporters reject mixed bfloat16/float16 graphs. Variables are float32 under a mixed policy, so
    the weights carry over exactly.
    """
    if not any(layer.dtype_policy.name.startswith("mixed") for layer in all_layers(model)):
        return model

    def fix(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and str(node.get("config", {}).get("name", "")).startswith("mixed"):
                return "float32"
            return {key: fix(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fix(value) for value in node]
        return node

    config = fix(model.get_config())
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def all_layers(layer: keras.layers.Layer):
    """``layer`` and every layer nested in it (models inside models)."""
    yield layer
    for child in getattr(layer, "layers", []):
        yield from all_layers(child)


def portable(model: keras.Model) -> keras.Model:
    """``model`` as a file that plain Keras loads: compiled, if at all, with Keras's own Adam, sparse
    categorical cross-entropy and accuracy (same weights).

    Training compiles with cnnkit's label-smoothed loss and, for discriminative fine-tuning, its
    layer-wise optimizers; ``keras.models.load_model("model.keras")`` without cnnkit imported could
    not find those classes and failed. The optimizer's state is training's, kept in ``last.keras``.
    """
    if getattr(model, "compiled", False):  # training's compile: a copy gets Keras's own
        clone = model.__class__.from_config(model.get_config())
        clone.set_weights(model.get_weights())
        model = clone
    # an uncompiled model (the float32 or full-size copy of a mixed-precision or progressive run) too:
    # compiled, a plain Keras user's evaluate() works on it
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def save_model(model: keras.Model, path: str | Path, meta: ModelMeta) -> Path:
    """Save ``model`` (``portable``) with ``meta`` inside the archive, atomically (temp file + rename)."""
    path = Path(path)
    with atomic_path(path, suffix=".keras") as tmp:
        portable(model).save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(META_MEMBER, json.dumps(asdict(meta), indent=2))
    return path


def read_meta(path: str | Path) -> ModelMeta | None:
    """The cnnkit metadata inside a ``.keras`` file, or None for a plain Keras model."""
    raw = read_model_metadata(path)
    return None if raw is None else ModelMeta.from_dict(raw)

def load_model(source: str | Path) -> tuple[keras.Model, ModelMeta]:
    """Load a model and its metadata from a run directory or a ``.keras`` file.

    A plain Keras model (no cnnkit metadata) is accepted when its input shape is known; its class
    names default to "0", "1", ... and a warning-worthy ``input_scale="unknown"`` is recorded.

    Raises:
        RunNotFoundError: nothing at that path.
        ModelError: the file is not a loadable Keras model.
    """
    path = model_path(source)
    meta = read_meta(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for unloadable files
        raise ModelError(f"Cannot load model '{path}': {exc}") from exc
    if meta is None:
        meta = _meta_from_plain_model(model, path)
        meta.extra["warnings"] = check_plain_model(model, path)
        for message in meta.extra["warnings"]:
            warn(message)
        model = _with_softmax(model)
    return model, meta


def _ends_in_logits(model: keras.Model) -> bool:
    """One multi-class output from a linear last layer: logits, which ``_with_softmax`` turns into
    probabilities (a single linear unit is a sigmoid's logit, not ours to change)."""
    last = model.layers[-1]
    return (getattr(getattr(last, "activation", None), "__name__", None) == "linear" and bool(model.inputs)
            and len(model.outputs) == 1 and getattr(last, "units", None) != 1)


def _with_softmax(model: keras.Model) -> keras.Model:
    """A plain model ending in a linear layer outputs logits (the tutorials' ``from_logits=True``
    pattern): a softmax after it gives the class probabilities cnnkit reads (confidences of 22,536%
    otherwise). Other endings are left as they are."""
    if not _ends_in_logits(model):
        return model
    return keras.Model(model.inputs, keras.layers.Softmax(name="cnnkit_softmax")(model.outputs[0]), name=model.name)


# Layers that bring raw 0-255 pixels into a network's range; a plain model without one near its
# input was probably trained on pre-scaled [0, 1] or [-1, 1] images.
_SCALING_LAYERS = ("Rescaling", "Normalization")


def check_plain_model(model: keras.Model, path: str | Path) -> list[str]:
    """What a plain Keras ``.keras`` (no cnnkit metadata) gets wrong for cnnkit, in words.

    cnnkit feeds raw 0-255 pixels and reads the last layer as class probabilities, so it checks
    for a scaling layer among the first layers (nested models included) and a softmax at the end.
    """
    found = []
    first = []
    for layer in model.layers[:6]:
        first.append(type(layer).__name__)
        if isinstance(layer, keras.Model):
            first += [type(inner).__name__ for inner in layer.layers[:6]]
    if not any(name in _SCALING_LAYERS for name in first):
        found.append(
            f"'{path}' has no Rescaling or Normalization layer near its input, but cnnkit feeds it raw 0-255 pixels: if "
            "it was trained on images scaled to [0, 1] or [-1, 1], its predictions will be wrong. Put the scaling "
            "inside the model (keras.layers.Rescaling(1/255) after the Input) and save it again.")
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    if isinstance(last, (keras.layers.Dense, keras.layers.Activation)) and name != "softmax":
        treated = ("cnnkit reads them as logits and applies a softmax" if _ends_in_logits(model)
                   else "so confidences will be wrong")
        found.append(
            f"'{path}' ends in '{last.name}' with activation '{name}', not softmax: its outputs are not class "
            f"probabilities ({treated}). Add keras.layers.Softmax() at the end and save it again.")
    return found


def _meta_from_plain_model(model: keras.Model, path: Path) -> ModelMeta:
    shape = model.inputs[0].shape if model.inputs else None
    if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None or shape[3] not in (1, 3):
        raise ModelError(
            f"'{path}' has no cnnkit metadata and its input shape {shape} is not (None, height, width, 1|3). "
            "cnnkit can only use image classifiers."
        )
    outputs = int(model.outputs[0].shape[-1])
    return ModelMeta(
        class_names=[str(i) for i in range(outputs)],
        image_size=(int(shape[1]), int(shape[2])),
        color_mode="rgb" if shape[3] == 3 else "grayscale",
        architecture=model.name,
        input_scale="unknown",
    )


def update_meta(path: str | Path, **extra: Any) -> ModelMeta:
    """Merge ``extra`` into the ``extra`` metadata of a cnnkit ``.keras`` file, atomically.

    The other archive members (config, weights) are copied unchanged into a temporary file that
    replaces the original. A value of None removes the key. Used by calibration
    (``temperature``, ``min_confidence``).

    Raises:
        ModelError: the file has no cnnkit metadata (not written by cnnkit).
    """
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise ModelError(f"'{path}' has no cnnkit metadata (not written by 'cnnkit train'); cannot store {sorted(extra)}.")
    merged = {**meta.extra, **extra}
    meta = ModelMeta.from_dict({**asdict(meta), "extra": {k: v for k, v in merged.items() if v is not None}})
    with atomic_path(path, suffix=".keras") as tmp, zipfile.ZipFile(path) as src, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename != META_MEMBER:
                with src.open(item) as member, dst.open(item, "w") as copy:
                    while chunk := member.read(1 << 20):
                        copy.write(chunk)
        dst.writestr(META_MEMBER, json.dumps(asdict(meta), indent=2))
    return meta
