"""Grad-CAM: a model + images -> heatmaps of where the model looked, and image | heatmap | overlay PNGs.

In: a cnnkit model (or a run directory / ``.keras`` file) and uint8 images or image files.
Out: heatmaps (N, height, width) in [0, 1] (``compute_gradcam``), ``Heatmap`` results and PNGs (``explain``).

Grad-CAM (Selvaraju et al. 2017): weight the last convolutional feature maps by the gradient of the
class score (the logit before the softmax) with respect to them, sum over channels, keep the
positive part, scale to [0, 1] and resize to the image. The gradient weights each position on its
own (HiResCAM), which is Grad-CAM itself for globally pooled heads (see ``_cam``). The logit, not the probability: a confident
prediction has a probability of 1.0 whose gradient vanishes (float32), which would give an empty map
for exactly the images a model is surest of. The layer is found automatically for any model in the zoo: the last
layer with a 4-D output (a feature map) before the head (flatten / global pooling / dense); pooling
and dropout layers are skipped because they only coarsen or copy the map before them. A nested
backbone (transfer models) counts as one layer, so its final feature map is used.

The model is split at that layer into ``body`` (images -> feature maps) and ``head`` (feature maps
-> probabilities); the one gradient call is backend-specific and lives in ``cnnkit/_backends/``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from cnnkit._backends import gradients, require_gradients
from cnnkit._progress import progress_task, warn
from cnnkit.errors import ModelError

# Layers that end the feature-map part of a network: after one of these there is no spatial map.
_HEAD_TYPES = ("Flatten", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Dense")
# 4-D layers that only coarsen, copy or rescale the map before them: the map before is sharper.
_SKIP_TYPES = ("MaxPooling2D", "AveragePooling2D", "Dropout", "SpatialDropout2D", "Rescaling", "InputLayer",
               "Normalization")


@dataclass
class Heatmap:
    """Grad-CAM of one image.

    Attributes:
        image: the decoded image the model saw, uint8 (height, width, channels).
        heatmap: (height, width) float32 in [0, 1], resized to the image.
        class_index, class_name: the class explained.
        probability: the model's probability of that class.
        predicted: the predicted class name.
        layer: the layer whose feature maps were used.
        path: where the PNG was written (None until written).
    """

    image: np.ndarray
    heatmap: np.ndarray
    class_index: int
    class_name: str
    probability: float
    predicted: str
    layer: str
    source: str = ""
    path: Path | None = None


def _layer_output(layer: keras.layers.Layer) -> keras.KerasTensor:
    """The layer's output in its parent graph (a nested model's ``.output`` is its inner graph's)."""
    nodes = getattr(layer, "_inbound_nodes", None)
    if nodes:
        return nodes[-1].output_tensors[0]
    return layer.output


def _is_feature_map(layer: keras.layers.Layer) -> bool:
    try:
        shape = _layer_output(layer).shape
    except (AttributeError, ValueError, IndexError):
        return False
    return len(shape) == 4 and (shape[1] or 0) > 1 and (shape[2] or 0) > 1


def find_gradcam_layer(model: keras.Model) -> str:
    """The name of the layer Grad-CAM uses by default (see the module docstring).

    Raises:
        ModelError: the model has no 2-D feature map (e.g. only Dense layers).
    """
    candidate = None
    for layer in model.layers:
        kind = type(layer).__name__
        # a Dense on a 4-D tensor (ResNet's caffe preprocessing) is per-pixel, not the head
        if (kind in _HEAD_TYPES and not _is_feature_map(layer)) or kind.startswith("Global"):
            break
        if kind in _SKIP_TYPES or kind.startswith("Random") or not _is_feature_map(layer):
            continue
        candidate = layer.name
    if candidate is None:
        raise ModelError(f"Model '{model.name}' has no convolutional feature map before its head, so Grad-CAM "
                         "cannot be computed. Pass --layer with a layer that outputs (batch, height, width, "
                         "channels).")
    return candidate


def _layer_input(layer: keras.layers.Layer) -> keras.KerasTensor:
    """The layer's input in its parent graph."""
    return layer._inbound_nodes[-1].input_tensors[0]


def _class_scores(model: keras.Model) -> keras.KerasTensor:
    """The pre-softmax class scores of ``model``: a linear copy of its final softmax Dense layer, same weights.

    A model ending in a Softmax layer (cnnkit puts one after a plain model's logits) gives that
    layer's input. Models that end otherwise keep their own output.
    """
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return _layer_input(last)
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if not isinstance(last, keras.layers.Dense) or activation != "softmax":
        return model.outputs[0]
    linear = keras.layers.Dense(last.units, dtype="float32", name="gradcam_logits")
    scores = linear(_layer_input(last))
    linear.set_weights(last.get_weights())
    return scores


def split_model(model: keras.Model, layer_name: str | None = None) -> tuple[keras.Model, keras.Model, str]:
    """(body, head, layer name): body maps images to the layer's feature maps, head maps those to class scores.

    The scores are the logits before the final softmax (Grad-CAM differentiates those), or the
    model's own outputs when it has no softmax Dense layer at the end.
    """
    name = layer_name or find_gradcam_layer(model)
    try:
        layer = model.get_layer(name)
    except ValueError:
        import difflib

        names = [lay.name for lay in model.layers if _is_feature_map(lay)]
        near = difflib.get_close_matches(name, names, n=1)
        raise ModelError(f"Model '{model.name}' has no layer '{name}'. Layers with feature maps: "
                         f"{', '.join(names) or 'none'}." + (f" Did you mean '{near[0]}'?" if near else "")
                         + f" Received: layer={name!r}") from None
    if not _is_feature_map(layer):
        raise ModelError(f"Layer '{name}' of '{model.name}' does not output a 2-D feature map "
                         f"(its output shape is {_layer_output(layer).shape}). Choose a convolutional layer. "
                         f"Received: layer={name!r}")
    features = _layer_output(layer)
    try:
        body = keras.Model(model.inputs, features, name="gradcam_body")
        head = keras.Model(features, _class_scores(model), name="gradcam_head")
    except Exception as exc:  # Keras raises ValueError/TypeError for graphs it cannot cut there
        raise ModelError(f"Cannot split '{model.name}' at layer '{name}' ({exc}): later layers also use "
                         "earlier ones (a skip connection). Choose a layer after the last skip connection, "
                         f"e.g. the default. Received: layer={name!r}") from exc
    return body, head, name


def compute_gradcam(model: keras.Model, images: np.ndarray, class_indices: np.ndarray | None = None,
                    layer: str | None = None, batch_size: int = 32,
                    on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Grad-CAM heatmaps for raw uint8 images.

    Args:
        model: a cnnkit model (raw 0-255 pixels in, probabilities out).
        images: (N, height, width, channels) uint8.
        class_indices: (N,) class to explain per image; None explains the predicted class.
        layer: the feature-map layer (default: ``find_gradcam_layer``).
        on_batch: called with the number of images after each batch (a progress bar's advance).

    Returns:
        ``(heatmaps, probabilities, layer_name)``: heatmaps (N, height, width) float32 in [0, 1],
        probabilities (N, num_classes).
    """
    body, head, name = split_model(model, layer)
    maps, all_probs = [], []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*structure of `inputs`.*")
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start : start + batch_size]).astype(np.float32)
            features = keras.ops.convert_to_numpy(body(batch, training=False)).astype(np.float32)
            scores = keras.ops.convert_to_numpy(head(features, training=False)).astype(np.float32)
            probs = _softmax(scores) if head.layers[-1].name == "gradcam_logits" else scores
            wanted = probs.argmax(axis=1) if class_indices is None else np.asarray(class_indices[start : start + batch_size])
            grads = gradients(head, features, wanted)
            maps.append(_cam(features, grads, images.shape[1:3]))
            all_probs.append(probs)
            if on_batch is not None:
                on_batch(len(batch))
    return np.concatenate(maps), np.concatenate(all_probs), name


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def _cam(features: np.ndarray, grads: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """ReLU of the gradient-weighted sum of the feature maps, position by position; scaled to [0, 1]; resized.

    Weighting each position by its own gradient (HiResCAM, Draelos & Carin 2020) equals Grad-CAM's
    spatially averaged weights when the head pools globally (``fast``, the backbones), and stays
    faithful when it does not: behind ``Flatten`` (the tutorials' ``simple`` and ``vgg``) one channel
    means different things at different positions, and averaging its gradients over space can cancel
    them out to an empty map (measured: every bottom-right image of a three-class corner test).
    """
    from PIL import Image

    cams = np.maximum(np.einsum("nhwc,nhwc->nhw", features, grads), 0.0)
    out = np.empty((len(cams), *image_size), np.float32)
    for i, cam in enumerate(cams):
        top = float(cam.max())
        cam = cam / top if top > 0 else cam
        resized = Image.fromarray(cam.astype(np.float32), mode="F").resize(image_size[::-1], Image.BILINEAR)
        out[i] = np.clip(np.asarray(resized), 0.0, 1.0)
    return out


def explain(
    run: str | Path,
    images: list[str | Path],
    *,
    class_name: str | None = None,
    layer: str | None = None,
    out: str | Path | None = None,
) -> list[Heatmap]:
    """Grad-CAM for image files, written as PNGs (image | heatmap | overlay) side by side.

    Args:
        run: a run directory or a ``.keras`` file.
        images: image files, folders or globs (decoded exactly as in training).
        class_name: explain this class instead of the predicted one.
        layer: the feature-map layer (default: the last one before the head, found automatically).
        out: folder for the PNGs (default ``<run>/explain``); ``None`` with a ``.keras`` file writes
            beside it.

    Returns:
        One Heatmap per decodable image, each with ``path`` set.

    Raises:
        DataError: no image could be decoded. ModelError: unknown class or layer.

    Example:
        >>> paths = [h.path for h in cnnkit.explain("runs/first", ["some.jpg"])]
    """
    from cnnkit.data.decode import DecodeError
    from cnnkit.data.scan import SkippedFile, expand_inputs
    from cnnkit.errors import DataError
    from cnnkit.plots import plot_gradcam
    from cnnkit.predict import Predictor
    from cnnkit.rundir import output_folder

    require_gradients("explain")
    run = Path(run)
    predictor = Predictor(run)
    names = predictor.class_names
    target = None
    if class_name is not None:
        if class_name not in names:
            import difflib

            near = difflib.get_close_matches(class_name, names, n=1)
            raise ModelError(f"The model has no class '{class_name}'. Classes: {', '.join(names)}."
                             + (f" Did you mean '{near[0]}'?" if near else "") + f" Received: class={class_name!r}")
        target = names.index(class_name)
    paths, missing = expand_inputs(list(images))
    decoded, sources = [], []
    for path in paths:
        try:
            decoded.append(predictor.load(path))
            sources.append(path)
        except DecodeError as exc:
            missing.append(SkippedFile(path, exc.reason))
    for skipped in missing:
        warn(f"cannot explain '{skipped.path}': {skipped.reason}")
    if not decoded:
        reasons = "; ".join(f"{m.path}: {m.reason}" for m in missing) or "no images found"
        raise DataError(f"No image to explain ({reasons}). Pass image files, folders or glob patterns.")
    pixels = np.stack(decoded)
    wanted = None if target is None else np.full(len(pixels), target)
    with progress_task("Grad-CAM", len(pixels)) as advance:
        heatmaps, probs, used = compute_gradcam(predictor.model, pixels, wanted, layer, on_batch=advance)
    out_dir = Path(out) if out else output_folder(run, "explain")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    stems = [Path(src).stem for src in sources]
    with progress_task("Writing PNGs", len(pixels)) as advance:
        for i, (image, heat, p, src) in enumerate(zip(pixels, heatmaps, probs, sources)):
            index = int(p.argmax()) if target is None else target
            h = Heatmap(image, heat, index, names[index], float(p[index]), names[int(p.argmax())], used, str(src))
            stem = stems[i] if stems.count(stems[i]) == 1 else f"{i:04d}_{stems[i]}"  # same name, other folder
            h.path = plot_gradcam(h, out_dir / f"{stem}_gradcam_{names[index]}.png")
            results.append(h)
            advance(1)
    return results
