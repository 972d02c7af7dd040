"""Prediction stage: a run directory or ``.keras`` file + images -> class names, confidences and top-k.

In: a model (``model.keras`` with its metadata) and image files, folders, globs, bytes or pixels.
Out: ``Prediction`` per image (label, confidence, top-k, or the reason it could not be read).

``Predictor`` opens images only through ``cnnkit.data.load_image`` (the training code path, with
the model's own image size, colour mode and resize mode), predicts in batches, and decodes the
next batch on worker threads while the model runs on the current one. Unreadable inputs come back
as per-file errors; the others are still predicted. A calibrated model (``cnnkit calibrate``) has
its temperature applied, and a prediction less confident than its ``min_confidence`` comes back as
``unknown``: the same rule for one image, a folder, and the server.

The forward pass runs on an engine (``cnnkit.engines``): Keras, or ONNX Runtime over the model's
ONNX export (``engine="onnxruntime"``), which imports no Keras at all. Decoding, batching,
calibration and abstaining are the same code for both.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnkit._backends.devices import usable_cpus
from cnnkit._progress import progress_task, quiet_retracing
from cnnkit.data.decode import DecodeError
from cnnkit.data.scan import IMAGE_EXTENSIONS, expand_inputs
from cnnkit.engines import Engine, KerasEngine, load_for, open_engine
from cnnkit.errors import ConfigError, DataError, ModelError
from cnnkit.metrics import apply_temperature
from cnnkit.rundir import ModelMeta, atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import keras

quiet_retracing()  # Python users of Predictor and Grad-CAM too, not only the CLI

# The label of a prediction less confident than the calibrated abstain threshold.
UNKNOWN_LABEL = "unknown"

# Images per model call when none is asked: about 2**18 pixels a call, a power of two from 64 to 256
# (256 for 32x32 images, 64 from 64x64 up). Measured with bench/predict.py (`fast`, 32x32, README
# "Inference engines"): 256 a call beat 64 on both engines in every round (1.06x keras, 1.05x
# onnxruntime end to end); bigger images already fill a call at 64.
PIXELS_PER_CALL = 2**18


def default_batch_size(image_size: tuple[int, int]) -> int:
    """Images per model call for images of ``image_size`` (height, width) when none is asked.

    Example:
        >>> default_batch_size((32, 32)), default_batch_size((64, 64)), default_batch_size((224, 224))
        (256, 64, 64)
    """
    per_call = PIXELS_PER_CALL // max(1, int(image_size[0]) * int(image_size[1]))
    return min(256, max(64, 2 ** int(math.log2(max(per_call, 1)))))


@dataclass
class Prediction:
    """One image's prediction (or why it could not be made).

    Attributes:
        path: the image (or a name for bytes).
        label: the most likely class name ("" when ``error``; "unknown" when its confidence is below
            the run's calibrated ``min_confidence``).
        confidence: its probability.
        top_k: the k most likely (class name, probability), best first.
        error: why the image could not be predicted, else None.
    """

    path: str
    label: str = ""
    confidence: float = 0.0
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "confidence": self.confidence,
                "top_k": [{"label": n, "probability": p} for n, p in self.top_k], "error": self.error}


class Predictor:
    """Loads a model once and predicts images with exactly the training decode path.

    Args:
        source: a run directory (``model.keras`` inside), a ``.keras`` file, or an ONNX export folder.
        batch_size: images per model call (default: ``default_batch_size`` of the model's image size).
        workers: decode threads (default: every CPU this process may use, ``usable_cpus``).
        engine: "keras", "onnxruntime", or "auto" (onnxruntime when the model's export is cached and
            matched Keras, else keras; ``cnnkit.engines``). Default: onnxruntime for an ONNX export
            folder, else ``DEFAULT_ENGINE``. With onnxruntime, a ``.keras`` source is exported to ONNX
            once (cached by its SHA-256).

    Example:
        >>> predictor = cnnkit.Predictor("runs/first")
        >>> labels = [p.label for p in predictor.predict(["some.jpg", "other_folder/"])]
        >>> onnx = cnnkit.Predictor("runs/first", engine="onnxruntime")   # same answers within 1e-4
    """

    def __init__(self, source: str | Path, batch_size: int | None = None, workers: int | None = None,
                 engine: str | None = None) -> None:
        if batch_size is not None:  # before the model loads: a bad value fails at once
            _check_positive("batch_size", batch_size)
        self._setup(open_engine(source, engine), None, batch_size, workers)

    @classmethod
    def from_model(cls, model: keras.Model, meta: ModelMeta, batch_size: int | None = None) -> Predictor:
        """A Predictor over a Keras model already in memory."""
        return cls.from_engine(KerasEngine(model, meta), batch_size=batch_size)

    @classmethod
    def from_engine(cls, engine: Engine, meta: ModelMeta | None = None, batch_size: int | None = None,
                    workers: int | None = None) -> Predictor:
        """A Predictor over an open engine; ``meta`` replaces the engine's (e.g. a lower ``max_pixels``)."""
        self = cls.__new__(cls)
        self._setup(engine, meta, batch_size, workers)
        return self

    def _setup(self, engine: Engine, meta: ModelMeta | None, batch_size: int | None, workers: int | None) -> None:
        self.engine, self.meta = engine, meta or engine.meta
        self.batch_size = default_batch_size(self.meta.image_size) if batch_size is None else batch_size
        _check_positive("batch_size", self.batch_size)
        self.workers = workers or usable_cpus()
        self._use_calibration()

    @property
    def model(self) -> Any:
        """The Keras model (keras engine only: Grad-CAM needs it).

        Raises:
            ModelError: the engine is not keras.
        """
        if not isinstance(self.engine, KerasEngine):
            raise ModelError(f"This predictor runs on the {self.engine.name} engine, which has no Keras model; "
                             "Grad-CAM and other model work need engine='keras'. "
                             f"Received: engine={self.engine.name!r}")
        return self.engine.model

    def _use_calibration(self) -> None:
        """Temperature and abstain threshold stored by ``cnnkit calibrate`` (set them to override)."""
        self.temperature = float(self.meta.extra.get("temperature", 1.0))
        self.min_confidence: float | None = self.meta.extra.get("min_confidence")

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (*self.meta.image_size, 3 if self.meta.color_mode == "rgb" else 1)

    def load(self, source: str | Path | bytes, name: str | None = None) -> np.ndarray:
        """Decode one image exactly as this model was trained on (uint8, ``input_shape``)."""
        return load_for(self.meta, source, name)

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, num_classes) for raw 0-255 pixels (N, height, width, channels).

        Raises:
            DataError: wrong shape, or float pixels already scaled to [0, 1] (the model scales
                raw 0-255 pixels itself; pre-scaled input would be scaled twice).
        """
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.shape[1:] != self.input_shape:
            raise DataError(f"Expected images of shape (N, {', '.join(map(str, self.input_shape))}). "
                            f"Received: shape={images.shape}")
        if images.dtype != np.uint8 and images.size and float(np.max(images)) <= 1.0:
            raise DataError("Pixels look pre-scaled to [0, 1], but this model takes raw 0-255 pixels and scales "
                            "them itself. Pass the uint8 image (or multiply by 255).")
        probs = [self._call(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        probs = np.concatenate(probs) if probs else np.zeros((0, len(self.class_names)), np.float32)
        return apply_temperature(probs, self.temperature)

    def _call(self, batch: np.ndarray) -> np.ndarray:
        return self.engine.predict_proba(batch)

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        _check_positive("top_k", k)
        k = min(k, len(self.class_names))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.class_names[j], float(p[j])) for j in row] for p, row in zip(probs, order)]

    def abstains(self, confidence: float) -> bool:
        """True when ``confidence`` is below the calibrated abstain threshold (the answer is ``unknown``)."""
        return self.min_confidence is not None and confidence < self.min_confidence

    def _prediction(self, name: str, ranked: list[tuple[str, float]]) -> Prediction:
        label, confidence = ranked[0]
        return Prediction(name, UNKNOWN_LABEL if self.abstains(confidence) else label, confidence, ranked)

    def predict_image(self, source: str | Path | bytes | np.ndarray, top_k: int = 3) -> Prediction:
        """One image (a path, encoded bytes, or raw uint8 pixels of ``input_shape``) -> Prediction.

        Raises:
            DecodeError: the file or bytes cannot be decoded (``.reason`` says why).
        """
        name = str(source) if isinstance(source, (str, Path)) else "<image>"
        pixels = source if isinstance(source, np.ndarray) else self.load(source, name=name)
        return self._prediction(name, self.top_k(self.predict_arrays(pixels), top_k)[0])

    def predict(self, inputs: list[str | Path] | str | Path, top_k: int = 3) -> list[Prediction]:
        """Predict images named by files, folders (recursive) and glob patterns.

        Returns one Prediction per image, in input order: images found in folders (hidden and
        non-image files there are ignored), named files, glob matches; a Prediction with ``error``
        for each named input that is missing or cannot be decoded.
        """
        _check_positive("top_k", top_k)
        paths, errors = list_inputs(inputs)
        return self.predict_files(paths, errors, top_k)

    def predict_files(self, paths: list[str | Path], errors: list[str | None] | None = None,
                      top_k: int = 3) -> list[Prediction]:
        """Predict image files in order; ``errors[i]``, when not None, is already why ``paths[i]`` fails.

        What ``predict`` runs after listing its inputs, and what each Ray worker runs on its share
        of them (``cnnkit.predict_ray``).
        """
        _check_positive("top_k", top_k)
        paths = [p if isinstance(p, Path) else Path(p) for p in paths]
        missing = {i: e for i, e in enumerate(errors or []) if e is not None}
        results: list[Prediction] = []
        with progress_task("Predicting", len(paths)) as advance:
            for batch_paths, images, batch_errors in self._decoded_batches(paths, missing):
                probs = self.predict_arrays(images) if images is not None else None
                ranked = iter(self.top_k(probs, top_k)) if probs is not None else iter(())
                for path, err in zip(batch_paths, batch_errors):
                    if err is not None:
                        results.append(Prediction(str(path), error=err))
                    else:
                        results.append(self._prediction(str(path), next(ranked)))
                advance(len(batch_paths))
        return results

    def _decode_part(self, items: list[tuple[Path, str | None]]) -> tuple[np.ndarray | None, list[str | None]]:
        """Part of a batch, decoded on a worker thread: its good images stacked (or None), and each error."""
        images, errors = [], []
        for path, known_error in items:
            if known_error is not None:
                errors.append(known_error)
                continue
            try:
                images.append(self.load(path))
                errors.append(None)
            except DecodeError as exc:
                errors.append(exc.reason)
        return (np.stack(images) if images else None), errors

    def _decoded_batches(self, paths: list[Path], errors: dict[int, str]
                         ) -> Iterator[tuple[list[Path], np.ndarray | None, list[str | None]]]:
        """Batches of decoded, stacked images: the next ones decode on threads while this one predicts.

        A batch is one task, stacked on its thread, so the main thread (which runs the model) does
        nothing per image but build its Prediction; with fewer batches than threads (a small job, a
        Ray block) each batch is split so that every thread decodes. At most 5 batches are in flight.
        """
        items = [(p, errors.get(i)) for i, p in enumerate(paths)]
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        parts = max(1, math.ceil(self.workers / max(len(chunks), 1)))  # tasks per batch
        ahead = min(math.ceil(self.workers / parts), 4) + 1  # batches in flight: one per thread, one ready

        def submit(chunk: list) -> list[concurrent.futures.Future]:
            size = math.ceil(len(chunk) / parts)
            return [pool.submit(self._decode_part, chunk[i : i + size]) for i in range(0, len(chunk), size)]

        pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        try:
            pending = collections.deque(submit(chunk) for chunk in chunks[:ahead])
            for i, chunk in enumerate(chunks):
                decoded = [future.result() for future in pending.popleft()]
                if i + ahead < len(chunks):
                    pending.append(submit(chunks[i + ahead]))
                stacks = [images for images, _ in decoded if images is not None]
                images = None if not stacks else stacks[0] if len(stacks) == 1 else np.concatenate(stacks)
                yield [p for p, _ in chunk], images, [e for _, part_errors in decoded for e in part_errors]
        finally:  # a stopped consumer (an error, Ctrl-C) waits for no batch it will not use
            pool.shutdown(wait=True, cancel_futures=True)


def list_inputs(inputs: list[str | Path] | str | Path) -> tuple[list[Path], list[str | None]]:
    """The image files named by files, folders (recursive) and globs, in order, and why each fails.

    A named input that is missing or not an image is listed with its reason; hidden and non-image
    files found inside folders are not inputs and are left out.

    Raises:
        DataError: no image at all.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    paths: list[Path] = []
    errors: list[str | None] = []
    for item in inputs:
        found, skipped = expand_inputs([item])
        if Path(item).is_dir():
            skipped = []  # .DS_Store, notes.txt... inside a folder are not the user's inputs
        for s in skipped:
            paths.append(s.path)
            errors.append(s.reason)
        paths.extend(found)
        errors.extend([None] * len(found))
    if not paths:
        raise DataError(f"No images found in {', '.join(map(str, inputs))}. "
                        f"Supported: {', '.join(IMAGE_EXTENSIONS)}.")
    return paths, errors


# File formats of ``write_predictions`` (and of ``cnnkit predict --format``, but for ``table``).
PREDICTION_FORMATS = ("csv", "json", "parquet")
CSV_HEADER = ("path", "label", "confidence", "top_k", "error")


def predictions_text(results: list[Prediction], fmt: str) -> str:
    """``results`` as CSV (``path,label,confidence,top_k,error``; top_k ``name:p;name:p``) or a JSON list.

    Example:
        >>> predictions_text([Prediction("a.jpg", "cat", 0.9, [("cat", 0.9), ("dog", 0.1)])], "csv").splitlines()[1]
        'a.jpg,cat,0.900000,cat:0.900000;dog:0.100000,'
    """
    if fmt == "json":
        return json.dumps([r.to_dict() for r in results], indent=2) + "\n"
    if fmt != "csv":
        raise ConfigError("Predictions are written as csv or json text (parquet only to a file). "
                          f"Received: fmt={fmt!r}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_HEADER)
    for r in results:
        writer.writerow([r.path, r.label, f"{r.confidence:.6f}" if not r.error else "",
                         ";".join(f"{n}:{p:.6f}" for n, p in r.top_k), r.error or ""])
    return buffer.getvalue()


def write_predictions(results: list[Prediction], path: str | Path, fmt: str) -> Path:
    """Write ``results`` to ``path`` atomically: csv or json as ``predictions_text``, or Parquet.

    Parquet columns: path, label, confidence (float64), top_k (list of {label, probability}),
    error (null when predicted). It needs pyarrow (``pip install "cnnkit[ray]"`` brings it).
    """
    if fmt not in PREDICTION_FORMATS:
        raise ConfigError(f"Prediction files are {', '.join(PREDICTION_FORMATS)}. Received: format={fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt != "parquet":
        with atomic_path(path, "." + fmt) as tmp:  # file names that are not UTF-8 survive, as on stdout
            tmp.write_text(predictions_text(results, fmt), encoding="utf-8", errors="surrogateescape", newline="")
        return path
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("Writing Parquet needs pyarrow: pip install pyarrow (or \"cnnkit[ray]\"), or use "
                          "--format csv or json. Received: format='parquet'") from exc
    table = pa.table({
        "path": [r.path for r in results], "label": [r.label for r in results],
        "confidence": pa.array([r.confidence for r in results], pa.float64()),
        "top_k": pa.array([[{"label": n, "probability": p} for n, p in r.top_k] for r in results],
                          pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))),
        "error": pa.array([r.error for r in results], pa.string())})
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)
    return path


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1. Received: {name}={value!r}")
