"""Deploy stage: export. A run's ``model.keras`` -> SavedModel (TensorFlow Serving), ONNX or TFLite.

Every format keeps the model's contract: raw 0-255 float pixels (N, height, width, channels) in,
class probabilities out (the scaling layer is inside the graph). Files land in
``RUN/export/<format>/`` (written in a temporary folder, renamed when complete), with a
``cnnkit.json`` beside them (class names, image size, colour and resize mode, input scale):

    savedmodel/1/           TensorFlow Serving's layout: model_base_path=RUN/export/savedmodel
    onnx/model.onnx         via Keras' ``model.export(format="onnx")`` (tf2onnx on TensorFlow)
    tflite/model.tflite     float32;  tflite/model_int8.tflite  dynamic-range int8 weights

All three are TensorFlow conversions (ONNX through tf2onnx: ``pip install "cnnkit[export]"``). A
process on JAX or PyTorch runs the conversion in a TensorFlow subprocess (``KERAS_BACKEND=tensorflow``)
that loads the ``.keras`` file, which gives the same probabilities on every backend; this is why
TensorFlow stays a core dependency whichever backend trains.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras

from cnnkit._backends import call_in_tensorflow
from cnnkit.errors import ConfigError
from cnnkit.models.saving import ModelMeta, load_model
from cnnkit.rundir import META_MEMBER, atomic_directory, check_replaceable, model_path, read_export_meta  # noqa: F401 (re-exported)

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
    format = format.strip().lower() if isinstance(format, str) else format  # ONNX, TFLite, SavedModel: the same
    if format not in FORMATS:
        raise ConfigError(f"Unknown export format '{format}'. Formats: {', '.join(FORMATS)}. Received: format={format!r}")
    path = model_path(run)
    out_dir = Path(out) if out is not None else path.parent / "export" / format
    check_replaceable(out_dir, (META_MEMBER,), "cnnkit export")  # before any work, on any backend
    if keras.backend.backend() != "tensorflow":
        return _export_in_tensorflow(path, format, out_dir)
    model, meta = load_model(path)
    with atomic_directory(out_dir, (META_MEMBER,), "cnnkit export") as work:
        files = {"savedmodel": _savedmodel, "onnx": _onnx, "tflite": _tflite}[format](model, work)
        (work / META_MEMBER).write_text(json.dumps(dataclasses.asdict(meta), indent=2), encoding="utf-8")
    return ExportResult(format, out_dir, [out_dir / f.relative_to(work) for f in files])


def _export_in_tensorflow(path: Path, format: str, out_dir: Path) -> ExportResult:
    """Run the TensorFlow conversion in a subprocess on the TensorFlow backend (this one is JAX or torch)."""
    files = call_in_tensorflow("cnnkit.deploy.formats:_exported_files", str(path), format, str(out_dir),
                               what=f"Exporting to {format}", received=f"format={format!r}, model={str(path)!r}")
    return ExportResult(format, out_dir, [Path(f) for f in files])


def _exported_files(path: str, format: str, out_dir: str) -> list[str]:
    """``export`` as the TensorFlow subprocess runs it: the files it wrote, as strings."""
    return [str(f) for f in export(path, format, out_dir).files]


def _savedmodel(model: keras.Model, work: Path) -> list[Path]:
    target = work / "1"  # TensorFlow Serving loads numbered version folders
    model.export(str(target), format="tf_saved_model", verbose=False)
    return [target]


def _onnx(model: keras.Model, work: Path) -> list[Path]:
    from cnnkit.engines import write_onnx

    write_onnx(model, work / "model.onnx")
    return [work / "model.onnx"]


def _tflite(model: keras.Model, work: Path) -> list[Path]:
    from cnnkit._backends.tensorflow import tflite_from_saved_model

    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        written = []
        for name, optimize in (("model.tflite", False), ("model_int8.tflite", True)):
            # int8: dynamic-range quantization (int8 weights, float activations)
            (work / name).write_bytes(tflite_from_saved_model(tmp, optimize))
            written.append(work / name)
    return written
