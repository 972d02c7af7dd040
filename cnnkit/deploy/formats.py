"""Deploy stage: export. A run's ``model.keras`` -> SavedModel (TensorFlow Serving), ONNX or TFLite.

Every format keeps the model's contract: raw 0-255 float pixels (N, height, width, channels) in,
class probabilities out (the scaling layer is inside the graph). Files land in
``RUN/export/<format>/`` (written in a temporary folder, renamed when complete), with a
``cnnkit.json`` beside them (class names, image size, colour and resize mode, input scale):

    savedmodel/1/           TensorFlow Serving's layout: model_base_path=RUN/export/savedmodel
    onnx/model.onnx         via Keras' ``model.export(format="onnx")`` (tf2onnx on TensorFlow)
    tflite/model.tflite     float32;  tflite/model_int8.tflite  dynamic-range int8 weights

SavedModel and TFLite need the TensorFlow backend; ONNX needs ``pip install tf2onnx onnx``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras

from cnnkit.errors import ConfigError, ModelError
from cnnkit.models.saving import ModelMeta, load_model
from cnnkit.rundir import META_MEMBER, atomic_directory, model_path

FORMATS = ("savedmodel", "onnx", "tflite")


@dataclass
class ExportResult:
    """What ``export()`` wrote: the format, its folder, and the model files in it."""

    format: str
    out_dir: Path
    files: list[Path]


def export(run: str | Path, format: str, out: str | Path | None = None) -> ExportResult:
    """Export a run's model for serving or devices.

    Args:
        run: a run directory or ``.keras`` file.
        format: "savedmodel", "onnx" or "tflite".
        out: the folder to write (default ``RUN/export/<format>``); replaced if it exists.

    Raises:
        ConfigError: unknown format. ModelError: the backend or a converter is missing.

    Example:
        >>> folder = cnnkit.export("runs/first", "savedmodel").out_dir   # serve it with TensorFlow Serving
    """
    if format not in FORMATS:
        raise ConfigError(f"Unknown export format '{format}'. Formats: {', '.join(FORMATS)}. Received: format={format!r}")
    path = model_path(run)
    model, meta = load_model(path)
    out_dir = Path(out) if out is not None else path.parent / "export" / format
    with atomic_directory(out_dir) as work:
        files = {"savedmodel": _savedmodel, "onnx": _onnx, "tflite": _tflite}[format](model, work)
        (work / META_MEMBER).write_text(json.dumps(dataclasses.asdict(meta), indent=2), encoding="utf-8")
    return ExportResult(format, out_dir, [out_dir / f.relative_to(work) for f in files])


def _need_tensorflow(format: str) -> None:
    if keras.backend.backend() != "tensorflow":
        raise ModelError(f"Exporting to {format} needs the TensorFlow backend; this process uses "
                         f"'{keras.backend.backend()}'. Run with KERAS_BACKEND=tensorflow.")


def _savedmodel(model: keras.Model, work: Path) -> list[Path]:
    _need_tensorflow("savedmodel")
    target = work / "1"  # TensorFlow Serving loads numbered version folders
    model.export(str(target), format="tf_saved_model", verbose=False)
    return [target]


def _onnx(model: keras.Model, work: Path) -> list[Path]:
    import numpy as np

    target = work / "model.onnx"
    shape = tuple(1 if d is None else int(d) for d in model.inputs[0].shape)
    model(np.zeros(shape, "float32"), training=False)  # Keras' ONNX exporter needs a model that has been called
    try:
        model.export(str(target), format="onnx", verbose=False)
    except ImportError as exc:
        raise ModelError(f"ONNX export needs extra packages ({exc}). Install them with "
                         "'pip install tf2onnx onnx' (TensorFlow backend) or 'pip install onnxscript' (torch).") from exc
    return [target]


def _tflite(model: keras.Model, work: Path) -> list[Path]:
    _need_tensorflow("tflite")
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        written = []
        for name, optimize in (("model.tflite", False), ("model_int8.tflite", True)):
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            if optimize:  # dynamic-range quantization: int8 weights, float activations
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            (work / name).write_bytes(converter.convert())
            written.append(work / name)
    return written


def read_export_meta(out_dir: str | Path) -> ModelMeta:
    """The ``cnnkit.json`` written beside exported files."""
    return ModelMeta.from_dict(json.loads((Path(out_dir) / META_MEMBER).read_text(encoding="utf-8")))
