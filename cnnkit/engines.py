"""Inference engines: what runs a model's forward pass for ``Predictor`` and the server.

Every engine has one contract: raw 0-255 pixels (N, height, width, channels) in, float32 class
probabilities (N, num_classes) out, plus the model's ``ModelMeta`` (class names, decode settings,
calibration). Two engines:

    keras         the ``.keras`` file on the Keras backend (TensorFlow, JAX or PyTorch).
    onnxruntime   the model exported to ONNX, run by ONNX Runtime: no Keras and no deep-learning
                  backend in the process (the slim serving image holds only this engine).

``open_engine(source, engine)`` takes a run directory, a ``.keras`` file or an ONNX export folder
(``model.onnx`` + ``cnnkit.json``; ``cnnkit export RUN -f onnx`` writes one). For a ``.keras``
source the onnxruntime engine exports once into ``$CNNKIT_HOME/onnx/<sha256 of the .keras>/``
(written in a temporary folder and renamed), so a calibrated or retrained model gets a new export.
Keras is imported only by the keras engine and by that export.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cnnkit._backends.devices import backend_name, usable_cpus
from cnnkit._progress import warn
from cnnkit.config import cnnkit_home
from cnnkit.data.decode import DecodeError, load_image
from cnnkit.errors import CnnkitError, ConfigError, ModelError
from cnnkit.metrics import apply_temperature
from cnnkit.rundir import (
    META_MEMBER,
    ONNX_MODEL,
    SOURCE_SHA256,
    ModelMeta,
    atomic_directory,
    atomic_path,
    is_onnx_export,
    model_path,
    read_export_meta,
    read_split_csv,
    sha256_file,
)

if TYPE_CHECKING:  # pragma: no cover
    import keras

ENGINES = ("keras", "onnxruntime")
# Measured with bench/predict.py (README, "Inference engines"): on idle 2-core EPYCs ONNX Runtime runs
# `fast` 1.06-1.13x Keras end to end, but its first use of a model costs an ONNX export (3.7 s), repaid
# only after ~80,000 images, and it needs cnnkit[export]; so Keras is the default of a first use.
DEFAULT_ENGINE = "keras"
# "auto" (cnnkit predict's default): onnxruntime once a model's export is ready (cached, and it matched
# Keras within PARITY_TOLERANCE on the run's test images when written), else keras. With the export paid
# for, ONNX Runtime skips TensorFlow's start-up (one image from the shell in 0.6 s instead of 8.8 s) and
# runs batches 0.99-1.13x Keras on idle EPYCs.
AUTO = "auto"
PARITY_TOLERANCE = 1e-4  # the bar for an engine to answer in Keras's place (the "same answers")
PARITY = "parity.json"  # in an export folder: how far ONNX Runtime was from Keras on the run's test images
PARITY_PIXELS = 2**21  # images x height x width compared for it: 512 images of 32x32, 41 of 224x224


class Engine(Protocol):
    """What ``Predictor`` needs from an engine."""

    name: str
    meta: ModelMeta

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, num_classes), float32, for raw 0-255 pixels (N, height, width, channels)."""
        ...


class KerasEngine:
    """A Keras model (``model.predict_on_batch``) and its metadata.

    Example:
        >>> engine = KerasEngine.load("runs/first")
        >>> engine.predict_proba(np.zeros((2, *engine.meta.image_size, 3), np.uint8)).shape[0]
        2
    """

    name = "keras"

    def __init__(self, model: keras.Model, meta: ModelMeta) -> None:
        self.model, self.meta = model, meta

    @classmethod
    def load(cls, source: str | Path) -> KerasEngine:
        from cnnkit.models.saving import load_model

        return cls(*load_model(source))

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(np.asarray(images, np.float32)), dtype=np.float32)


class OnnxEngine:
    """An ONNX export folder run by ONNX Runtime on the CPU (imports no Keras).

    Args:
        folder: holds ``model.onnx`` and ``cnnkit.json``.
        threads: threads for one model call (default: every CPU this process may use, ``usable_cpus``).

    Example:
        >>> engine = OnnxEngine(onnx_export("runs/first"))   # or a folder from 'cnnkit export RUN -f onnx'
        >>> engine.predict_proba(np.zeros((2, *engine.meta.image_size, 3), np.uint8)).shape[0]
        2
    """

    name = "onnxruntime"

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError("The onnxruntime engine needs ONNX Runtime: pip install onnxruntime "
                             f"(or use --engine keras). Received: engine='onnxruntime' ({exc})") from exc
        self.folder = Path(folder)
        self.meta = read_export_meta(self.folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cpus()
        options.inter_op_num_threads = 1  # one model call at a time (the server's queue has one thread)
        # Idle threads sleep instead of spinning: Predictor's decode threads need those cores between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.folder / ONNX_MODEL), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own types for unreadable models
            raise ModelError(f"ONNX Runtime cannot load '{self.folder / ONNX_MODEL}' ({exc}). Export it again with "
                             f"'cnnkit export RUN -f onnx'. Received: folder='{self.folder}'") from exc
        self._input = self.session.get_inputs()[0].name

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(images, dtype=np.float32)
        return np.asarray(self.session.run(None, {self._input: batch})[0], dtype=np.float32)


def check_engine(engine: str | None) -> None:
    """Raises ConfigError unless ``engine`` is None (the default), ``AUTO`` or one of ``ENGINES``."""
    if engine is not None and engine not in (*ENGINES, AUTO):
        raise ConfigError(f"Unknown inference engine '{engine}'. Engines: {', '.join(ENGINES)}, or {AUTO} "
                          f"(onnxruntime once a model's export is cached and matched Keras, else keras). "
                          f"Received: engine={engine!r}")


def engine_for(source: str | Path, engine: str | None = None) -> str:
    """The engine that will run ``source``: onnxruntime for an ONNX export folder; else ``engine`` if given,
    where ``AUTO`` means onnxruntime when ``ready_onnx_export(source)`` has one and keras otherwise; else the default.

    Raises:
        ConfigError: an unknown engine, or keras asked to run an ONNX export (it has no ``.keras``).
    """
    check_engine(engine)
    onnx = is_onnx_export(source)
    if engine == "keras" and onnx:
        raise ConfigError(f"'{source}' is an ONNX export: the keras engine needs a run directory or .keras file. "
                          "Use --engine onnxruntime, or pass the run. Received: engine='keras'")
    if onnx:
        return "onnxruntime"
    if engine == AUTO:
        return "onnxruntime" if ready_onnx_export(source) is not None else "keras"
    return engine or DEFAULT_ENGINE


def ready_onnx_export(source: str | Path, cache: str | Path | None = None) -> Path | None:
    """The cached ONNX export of ``source`` if ONNX Runtime may answer in Keras's place, else None.

    Ready means: ONNX Runtime is installed, the export is complete, and its ``parity.json`` (written with
    it) found ONNX Runtime's probabilities within ``PARITY_TOLERANCE`` of Keras's. A source that cannot
    be read is not ready: the keras engine's loader then says what is wrong with it.
    """
    if not _installed("onnxruntime"):
        return None
    try:
        folder = cached_onnx_export(source, cache)
    except (CnnkitError, OSError):
        return None
    return folder if folder is not None and parity_holds(folder) else None


def parity_holds(folder: str | Path) -> bool:
    """True when the export folder's ``parity.json`` records ONNX Runtime within ``PARITY_TOLERANCE`` of Keras."""
    try:
        diff = json.loads((Path(folder) / PARITY).read_text(encoding="utf-8"))["max_abs_prob_diff"]
    except (OSError, ValueError, KeyError, TypeError):  # none (no onnxruntime when exported) or damaged
        return False
    return isinstance(diff, (int, float)) and not isinstance(diff, bool) and 0 <= diff <= PARITY_TOLERANCE


def open_engine(source: str | Path, engine: str | None = None, threads: int | None = None) -> Engine:
    """A run directory, ``.keras`` file or ONNX export folder -> a ready engine.

    Args:
        source: what to run.
        engine: "keras", "onnxruntime" or ``AUTO`` (``engine_for``; default: onnxruntime for an ONNX
            export, else ``DEFAULT_ENGINE``). Under auto, a cached export ONNX Runtime cannot load gives
            a warning and Keras.
        threads: the onnxruntime engine's threads per call.

    Raises:
        ConfigError: unknown engine. RunNotFoundError / ModelError: nothing usable there.
    """
    if engine == AUTO and not is_onnx_export(source):
        ready = ready_onnx_export(source)  # hashed once: the folder, not just the decision
        if ready is not None:
            try:
                return OnnxEngine(ready, threads)
            except ModelError as exc:  # asked for by name, the error would stand; under auto, Keras answers
                warn(f"The cached ONNX export '{ready}' of this model cannot run ({exc}), so Keras answers instead; "
                     "delete that folder and the next --engine onnxruntime exports it again.")
        return KerasEngine.load(source)
    name = engine_for(source, engine)
    if name == "keras":
        return KerasEngine.load(source)
    return OnnxEngine(Path(source) if is_onnx_export(source) else onnx_export(source), threads)


def onnx_export(source: str | Path, cache: str | Path | None = None) -> Path:
    """The ONNX export of a run's ``.keras`` in ``cache`` (default ``$CNNKIT_HOME/onnx``), made on first use.

    The folder is named by the ``.keras`` file's SHA-256, so a changed model (calibrated, retrained)
    is exported again; a complete folder is reused (given a ``parity.json`` if it has none yet).
    """
    folder = _export_folder(source, cache)
    if not _complete(folder):
        return write_onnx_export(model_path(source), folder, folder.name)
    if not (folder / PARITY).is_file() and _installed("onnxruntime") and _installed("keras"):
        from cnnkit.models.saving import load_model  # an export from before parity.json: measure it now

        try:
            write_parity(folder, source, *load_model(model_path(source)))
        except (OSError, ImportError, CnnkitError) as exc:  # a read-only cache, a backend that fails to import
            warn(f"Could not compare the cached ONNX export '{folder}' with Keras ({exc}); it still runs when asked "
                 "for by name, and --engine auto keeps keras.")
    return folder


def cached_onnx_export(source: str | Path, cache: str | Path | None = None) -> Path | None:
    """The complete ONNX export of ``source`` already in ``cache``, or None (``onnx_export`` would write it)."""
    folder = _export_folder(source, cache)
    return folder if _complete(folder) else None


def _export_folder(source: str | Path, cache: str | Path | None) -> Path:
    """Where ``source``'s export lives in the cache: named by its ``.keras`` file's SHA-256."""
    return Path(cache or cnnkit_home() / "onnx") / sha256_file(model_path(source))


def _complete(folder: Path) -> bool:
    return is_onnx_export(folder) and _recorded_sha(folder) == folder.name


def _recorded_sha(folder: Path) -> str | None:
    try:
        return (folder / SOURCE_SHA256).read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return None


def write_onnx_export(source: str | Path, out: str | Path, digest: str | None = None) -> Path:
    """Export ``source`` (run or ``.keras``) to ONNX in the folder ``out``: ``model.onnx``, ``cnnkit.json``, ``source.sha256``.

    The folder is written beside ``out`` and renamed into place (replacing ``out``). Needs Keras and
    ``tf2onnx``; a JAX or PyTorch process converts in a TensorFlow subprocess (as ``cnnkit export`` does).

    Raises:
        ModelError: Keras or the converter is missing (the slim image serves export folders only), or it fails.
    """
    try:
        import keras
    except ImportError as exc:
        if _installed("keras"):  # installed, but its backend fails to import: that error says why
            raise
        raise ModelError(f"'{source}' is a Keras model, and this install has no Keras to export it to ONNX ({exc}); "
                         "the slim serving image runs ONNX export folders only. Export it where cnnkit is installed "
                         "in full ('cnnkit export RUN -f onnx') and serve that folder. "
                         f"Received: source='{source}'") from exc

    from cnnkit.models.saving import as_float32, load_model

    path = model_path(source)
    digest = digest or sha256_file(path)
    if keras.backend.backend() != "tensorflow":  # one converter, tf2onnx, whichever backend this process runs
        from cnnkit._backends import call_in_tensorflow

        call_in_tensorflow("cnnkit.engines:write_onnx_export", str(path), str(out), digest,
                           what="Exporting to ONNX", received=f"model={str(path)!r}")
        return Path(out)
    model, meta = load_model(path)
    out = Path(out)
    with atomic_directory(out, (META_MEMBER,), "cnnkit ONNX export") as work:
        write_onnx(as_float32(model), work / ONNX_MODEL)
        (work / META_MEMBER).write_text(json.dumps(asdict(meta), indent=2), encoding="utf-8")
        (work / SOURCE_SHA256).write_text(f"{digest}  {path.name}\n", encoding="utf-8")
        if _installed("onnxruntime"):  # what lets --engine auto choose it (an export for elsewhere needs none)
            write_parity(work, path, model, meta)
    return out


def load_for(meta: ModelMeta, source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode one image exactly as the model ``meta`` describes was trained on (uint8, its input shape)."""
    return load_image(source, meta.image_size, meta.color_mode, meta.resize_mode, meta.max_pixels, name=name)


def evaluation_images(source: str | Path, meta: ModelMeta) -> tuple[np.ndarray, str] | None:
    """Some of the run's own images, decoded as the model predicts them: its test split, else its
    validation split, else its training images (matching numbers needs no held-out images).

    Up to ``PARITY_PIXELS`` of pixels (512 images of 32x32, 41 of 224x224, at least 8), evenly spread
    over the split's rows in ``split.csv`` (so over its classes). None when the model has no
    ``split.csv`` beside it (a ``.keras`` moved alone) or fewer than 8 of the images (all, in a smaller
    split) can be read.
    """
    try:
        rows = read_split_csv(model_path(source)) or []
    except (CnnkitError, OSError):
        return None
    for split in ("test", "validation", "train"):
        chosen = [row for row in rows if row.split == split]
        if chosen:
            break
    else:
        return None
    height, width = meta.image_size
    limit = max(8, min(512, PARITY_PIXELS // (height * width)))
    images = []
    for index in np.unique(np.linspace(0, len(chosen) - 1, min(limit, len(chosen))).round().astype(int)):
        row = chosen[index]
        try:
            images.append(load_for(meta, row.path))
        except (DecodeError, OSError):  # moved or changed since training: the others still count
            continue
    return (np.stack(images), split) if len(images) >= min(8, len(chosen)) else None


def measure_parity(reference: Engine, candidate: Engine, images: np.ndarray, split: str = "test") -> dict:
    """What ``parity.json`` holds: how far ``candidate``'s probabilities (calibration applied) are from
    ``reference``'s on ``images``, and whether that is within ``PARITY_TOLERANCE``."""
    temperature = float(reference.meta.extra.get("temperature", 1.0))
    diffs = []
    for start in range(0, len(images), 32):  # in chunks: a few large images are memory enough
        chunk = images[start : start + 32]
        expected = apply_temperature(reference.predict_proba(chunk), temperature)
        diffs.append(np.abs(apply_temperature(candidate.predict_proba(chunk), temperature) - expected).max())
    diff = float(np.max(diffs))  # a NaN stays a NaN: not within
    return {"max_abs_prob_diff": diff, "tolerance": PARITY_TOLERANCE, "within": diff <= PARITY_TOLERANCE,
            "images": len(images), "split": split, "reference": f"{reference.name} ({backend_name()})",
            "candidate": candidate.name}


def write_parity(folder: Path, source: str | Path, model: Any, meta: ModelMeta) -> dict:
    """Measure ONNX Runtime in ``folder`` against the Keras ``model`` on ``source``'s evaluation images and
    write ``parity.json`` there (atomically): what lets ``--engine auto`` answer with ONNX Runtime."""
    found = evaluation_images(source, meta)
    if found is None:
        parity = {"max_abs_prob_diff": None, "within": False,
                  "reason": "no images of this model's run could be read (none listed: no split.csv beside it, or "
                            "moved since), so ONNX Runtime was not compared with Keras; --engine auto keeps keras"}
    else:
        try:
            parity = measure_parity(KerasEngine(model, meta), OnnxEngine(folder), *found)
        except Exception as exc:  # ONNX Runtime cannot load or run it (its own error types): the export stands
            parity = {"max_abs_prob_diff": None, "within": False, "reason": f"{type(exc).__name__}: {exc}"}
    with atomic_path(folder / PARITY) as tmp:
        tmp.write_text(json.dumps(parity, indent=2), encoding="utf-8")
    return parity


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # an import hook that refuses it, or a module set to None
        return False


def write_onnx(model: Any, target: Path) -> None:
    """``model`` (a Keras model) as an ONNX file at ``target`` (the one ONNX conversion of cnnkit)."""
    shape = tuple(1 if d is None else int(d) for d in model.inputs[0].shape)
    model(np.zeros(shape, "float32"), training=False)  # Keras' ONNX exporter needs a model that has been called
    try:
        with warnings.catch_warnings():  # Keras' tf2onnx shim probes np.object: a FutureWarning on every export
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"keras\.src\.export")
            model.export(str(target), format="onnx", verbose=False)
    except ImportError as exc:
        raise ModelError(f"ONNX export needs extra packages ({exc}). Install them with 'pip install tf2onnx onnx' "
                         "(TensorFlow backend) or 'pip install onnxscript' (torch), or use --engine keras. "
                         f"Received: target='{target}'") from exc
