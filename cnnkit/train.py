"""Training stage: a folder of images -> a run directory (model, config, history, curves, manifests).

``train()`` scans and decodes the folder (``cnnkit.data``), builds a model from the zoo
(``cnnkit.models``), fits it with EarlyStopping (best weights restored), ModelCheckpoint (best
validation loss) and ReduceLROnPlateau, and writes the run directory atomically:

    model.keras   raw uint8 pixels in, class probabilities out; class names inside the file
    run.json      every setting, class names, image size, colour mode, data hash, split sizes,
                  augmentation, versions, final metrics, warnings, status
    history.csv   per-epoch metrics        curves.png   accuracy and loss, train vs validation
    split.csv     path,class,split,sha256  skipped.csv  path,reason of every file left out

Ctrl-C stops training early but still writes the run (best checkpoint, ``status: interrupted``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import platform
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnnkit._progress import esc, progress_task, say, warn
from cnnkit._rundir import RunDirectory, write_json
from cnnkit._version import __version__
from cnnkit.config import RunConfig, config_from_dict
from cnnkit.data.batches import ArrayBatches
from cnnkit.data.dataset import LoadedData, load_image_folder, write_skipped_csv, write_split_csv
from cnnkit.models import LOSS, build_model, get_spec
from cnnkit.models.saving import ModelMeta, save_model

# Classes with fewer training images than this get a warning: below ~10 per class, validation
# accuracy swings by 10 points or more from one image, and the model cannot learn the class.
MIN_IMAGES_PER_CLASS = 10

# Flat keyword names accepted by train(**options), mapped to their config section.
_OPTION_SECTIONS = {
    "image_size": "data", "color_mode": "data", "resize_mode": "data", "val_split": "data",
    "test_split": "data", "seed": "data", "workers": "data", "max_pixels": "data",
    "model": "model",
    "epochs": "train", "batch_size": "train", "learning_rate": "train", "augment": "train",
    "patience": "train", "overfit_gap": "train",
}


@dataclass
class TrainResult:
    """What ``train()`` returns.

    Attributes:
        run_dir: the run directory written.
        model: the trained model (best epoch's weights).
        class_names: output index -> class name.
        history: per-epoch metrics (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ...).
        metrics: final metrics (validation, and test when a test split exists).
        data_hash: the data hash of the decoded images.
        warnings: diagnostics in words (overfitting, tiny classes, ...).
        status: "completed" or "interrupted".
    """

    run_dir: Path
    model: keras.Model
    class_names: list[str]
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    data_hash: str
    warnings: list[str] = field(default_factory=list)
    status: str = "completed"

    @property
    def val_accuracy(self) -> float | None:
        return self.metrics.get("val_accuracy")


def resolve_config(config: RunConfig | dict | None = None, **options: Any) -> RunConfig:
    """A RunConfig from a config object/dict plus flat options (``epochs=3``, ``model="vgg"``)."""
    overrides: dict[str, Any] = {}
    for key, value in options.items():
        if key not in _OPTION_SECTIONS:
            from cnnkit.config import _unknown_key

            raise _unknown_key("train() options", key, list(_OPTION_SECTIONS))
        section = _OPTION_SECTIONS[key]
        overrides[f"{section}.{'name' if key == 'model' else key}"] = value
    if isinstance(config, RunConfig):
        config = config.to_dict()
    return config_from_dict(config or {}, overrides)


def train(
    data_dir: str | Path,
    out: str | Path | None = None,
    config: RunConfig | dict | None = None,
    *,
    overwrite: bool = False,
    cache_root: Path | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    **options: Any,
) -> TrainResult:
    """Train a classifier on a folder of images and write a run directory.

    Args:
        data_dir: ``root/<class>/*.jpg``, or ``root/train/<class>/`` with optional
            ``validation/`` (``val/``) and ``test/``.
        out: the run directory to write (default ``runs/<model>-<timestamp>``).
        config: a RunConfig (or nested dict); ``options`` override it.
        overwrite: replace an existing run directory.
        cache_root: where decoded images are cached (default ``$CNNKIT_HOME/cache``).
        callbacks: extra Keras callbacks for ``fit`` (after cnnkit's own).
        **options: any config field by its flat name: ``model``, ``epochs``, ``batch_size``,
            ``learning_rate``, ``augment``, ``patience``, ``image_size``, ``color_mode``,
            ``resize_mode``, ``val_split``, ``test_split``, ``seed``, ``workers``, ...

    Returns:
        A TrainResult.

    Raises:
        DataError: the folder is unusable (named in the message).
        ModelError: unknown model name (valid names listed).
        RunExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> result = cnnkit.train("dataset", out="runs/first", model="simple", epochs=10)
        >>> result.metrics["val_accuracy"]
    """
    cfg = resolve_config(config, **options)
    spec = get_spec(cfg.model.name)  # fail fast on a wrong name, before any decoding
    if cfg.data.image_size is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=spec.default_image_size))
    out = Path(out) if out is not None else Path("runs") / f"{cfg.model.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    run = RunDirectory(out, overwrite=overwrite)
    try:
        return _train_into(run, Path(data_dir), cfg, cache_root, list(callbacks or []))
    except BaseException:
        run.discard()
        raise


def _train_into(run: RunDirectory, data_dir: Path, cfg: RunConfig, cache_root: Path | None,
                extra_callbacks: list[keras.callbacks.Callback]) -> TrainResult:
    started = time.time()
    data = load_image_folder(data_dir, cfg.data, cache_root=cache_root)
    write_skipped_csv(data.skipped, run.path / "skipped.csv")
    write_split_csv(data, run.path / "split.csv")
    warnings = _report_data(data, run.final)

    keras.utils.set_random_seed(cfg.data.seed)
    model = build_model(cfg.model.name, len(data.class_names), cfg.data.image_size, cfg.data.channels,
                        augment=cfg.train.augment, seed=cfg.data.seed)
    model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate), loss=LOSS, metrics=["accuracy"])
    train_rows, train_labels = data.split_rows("train")
    val_rows, val_labels = data.split_rows("validation")
    images = data.cache.images
    train_ds = ArrayBatches(images, train_rows, train_labels, cfg.train.batch_size, shuffle=True, seed=cfg.data.seed)
    val_ds = ArrayBatches(images, val_rows, val_labels, cfg.train.batch_size) if len(val_rows) else None
    monitor = "val_loss" if val_ds is not None else "loss"
    if val_ds is None:
        warnings.append(_warn("No validation images: EarlyStopping and the checkpoint follow the training loss, "
                              "which cannot show overfitting. Keep val_split > 0 or add a validation/ folder."))

    recorder = _HistoryRecorder()
    callbacks = [
        recorder,
        keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.train.patience, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(str(run.path / "checkpoint.keras"), monitor=monitor, save_best_only=True),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=max(1, cfg.train.patience // 2),
                                          min_lr=1e-6),
        _RichEpochs(cfg.train.epochs, len(train_ds)),
        *extra_callbacks,
    ]
    status = "completed"
    try:
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs, callbacks=callbacks, verbose=0)
    except KeyboardInterrupt:
        status = "interrupted"
        warn("Interrupted: keeping the best checkpoint so far.")
        checkpoint = run.path / "checkpoint.keras"
        if checkpoint.exists():
            model.load_weights(checkpoint)
    history = recorder.history
    metrics = _final_metrics(model, data, cfg, history, monitor)
    warnings += [_warn(m) for m in diagnose_history(history, len(data.class_names), cfg.train.overfit_gap)]
    meta = ModelMeta(data.class_names, cfg.data.image_size, cfg.data.color_mode, cfg.data.resize_mode,
                     cfg.model.name, max_pixels=cfg.data.max_pixels)
    save_model(model, run.path / "model.keras", meta)
    _write_history(history, run.path / "history.csv")
    if history.get("loss"):
        from cnnkit.plots import plot_curves

        plot_curves(history, run.path / "curves.png")
    record = _run_record(cfg, data, data_dir, metrics, warnings, status, time.time() - started, len(history.get("loss", [])))
    write_json(run.path / "run.json", record)
    run_dir = run.commit()
    return TrainResult(run_dir, model, data.class_names, history, metrics, data.data_hash, warnings, status)


def _warn(message: str) -> str:
    warn(message)
    return message


def _report_data(data: LoadedData, run_dir: Path) -> list[str]:
    """Print what was found and skipped; return data warnings."""
    sizes = data.split_sizes()
    sources = data.folder.split_source
    parts = [f"{split} {n}" + (" (split here, stratified)" if sources.get(split) == "split" else "")
             for split, n in sizes.items() if n]
    say(f"[bold]{len(data.class_names)} classes[/]: {esc(', '.join(data.class_names[:20]))}"
        + (" ..." if len(data.class_names) > 20 else ""))
    say(f"images: {', '.join(parts)}; data hash {data.data_hash[:12]}"
        + (" (decoded now)" if data.cache.decoded else " (cache reused)"))
    if data.skipped:
        reasons = Counter(s.reason.split(" (")[0] for s in data.skipped)
        summary = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        say(f"[yellow]skipped {len(data.skipped)} files[/]: {esc(summary)}. Listed in {esc(run_dir / 'skipped.csv')}")
    warnings = []
    counts = data.class_counts("train")
    tiny = [f"{name} ({n})" for name, n in counts.items() if n < MIN_IMAGES_PER_CLASS]
    if tiny:
        warnings.append(_warn(
            f"Classes with fewer than {MIN_IMAGES_PER_CLASS} training images: {', '.join(tiny)}. The model can "
            "hardly learn them and their validation accuracy is noise: add images to those classes."))
    if min(counts.values()) and max(counts.values()) / min(counts.values()) > 5:
        warnings.append(_warn(
            f"Classes are imbalanced ({max(counts.values())} vs {min(counts.values())} training images): "
            "accuracy will favour the large classes; check per-class recall with 'cnnkit evaluate'."))
    leak = _cross_split_copies(data)
    if leak:
        example = leak[0]
        warnings.append(_warn(
            f"{len(leak)} validation/test images are byte-identical copies of training images (e.g. '{example[0]}' = "
            f"'{example[1]}'): their accuracy is inflated. Remove the copies from one split; "
            f"'cnnkit doctor {data.folder.root}' also finds near-duplicates."))
    if sources.get("validation") == "folder":
        missing = [n for n, c in data.class_counts("validation").items() if c == 0]
        if missing:
            warnings.append(_warn(f"The validation folder has no images of: {', '.join(missing)}."))
    return warnings


def _cross_split_copies(data: LoadedData) -> list[tuple[Path, Path]]:
    """(held-out file, training file) pairs with the same bytes."""
    training = {d: f.path for f, d in zip(data.files, data.digests) if f.split == "train"}
    return [(f.path, training[d]) for f, d in zip(data.files, data.digests) if f.split != "train" and d in training]


class _HistoryRecorder(keras.callbacks.Callback):
    """Keeps per-epoch logs (and the learning rate) even when training is interrupted."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[float]] = {}
        self._started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        logs.setdefault("learning_rate", float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        logs["seconds"] = round(time.perf_counter() - self._started, 3)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))


class _RichEpochs(keras.callbacks.Callback):
    """One Rich progress bar per epoch: steps done, loss and accuracy so far."""

    def __init__(self, epochs: int, steps: int) -> None:
        super().__init__()
        self.epochs, self.steps = epochs, steps
        self._stack: contextlib.ExitStack | None = None
        self._advance = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._stack = contextlib.ExitStack()
        self._advance = self._stack.enter_context(progress_task(f"Epoch {epoch + 1}/{self.epochs}", self.steps))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._advance is not None:
            logs = logs or {}
            self._advance(1, info=f"loss {logs.get('loss', 0):.3f} acc {logs.get('accuracy', 0):.1%}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self._advance is not None and "val_loss" in logs:
            self._advance(0, info=f"loss {logs['loss']:.3f} acc {logs['accuracy']:.1%} | "
                                  f"val {logs['val_loss']:.3f} {logs['val_accuracy']:.1%}")
        self._close()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._close()

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._advance = None, None


class _BatchProgress(keras.callbacks.Callback):
    """Advances a progress bar per evaluation batch."""

    def __init__(self, advance) -> None:
        super().__init__()
        self._advance = advance

    def on_test_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._advance(1)


def diagnose_history(history: dict[str, list[float]], num_classes: int, overfit_gap: float = 0.15) -> list[str]:
    """The classic training mistakes, in words, from per-epoch metrics.

    * overfitting: validation accuracy trails training accuracy by more than ``overfit_gap`` at the
      end, with the epoch where the gap first opened;
    * accuracy stuck near chance (1/num_classes): labels or inputs are broken;
    * training loss not falling: the learning rate is too high or too low.
    """
    found: list[str] = []
    acc, val_acc, loss = history.get("accuracy", []), history.get("val_accuracy", []), history.get("loss", [])
    if acc and val_acc:
        gaps = np.array(acc) - np.array(val_acc)
        if gaps[-1] > overfit_gap:
            start = int(np.argmax(gaps > overfit_gap)) + 1
            found.append(
                f"Overfitting: validation accuracy ({val_acc[-1]:.1%}) trails training accuracy ({acc[-1]:.1%}) by "
                f"{gaps[-1]:.0%} (over {overfit_gap:.0%} since epoch {start}). EarlyStopping restored the best epoch; "
                "to generalise better try --augment standard, more images per class, a smaller model, or fewer epochs."
            )
    chance = 1.0 / max(num_classes, 1)
    best_acc = max(val_acc) if val_acc else (max(acc) if acc else None)  # the epoch EarlyStopping keeps
    if best_acc is not None and len(loss) >= 3 and best_acc < chance + 0.05:
        found.append(
            f"Accuracy is stuck near chance (best {best_acc:.1%} with {num_classes} classes = {chance:.1%}): check that the "
            "class folders hold the right images, that images are not blank, and try a lower --learning-rate."
        )
    if len(loss) >= 3 and not min(loss[1:]) < loss[0] * 0.98:
        found.append(
            f"Training loss did not fall in {len(loss)} epochs ({loss[0]:.3f} -> {loss[-1]:.3f}): the learning rate is "
            "probably too high (try --learning-rate 1e-4) or the data too hard for this model."
        )
    return found


def _final_metrics(model: keras.Model, data: LoadedData, cfg: RunConfig, history: dict[str, list[float]],
                   monitor: str) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if history.get(monitor):
        best = int(np.argmin(history[monitor]))
        metrics["best_epoch"] = best + 1
        metrics["epochs_run"] = len(history[monitor])
        metrics["train_accuracy"] = history["accuracy"][best]
        metrics["train_loss"] = history["loss"][best]
    for split, prefix in (("validation", "val_"), ("test", "test_")):
        rows, labels = data.split_rows(split)
        if len(rows):
            ds = ArrayBatches(data.cache.images, rows, labels, max(cfg.train.batch_size, 256))
            with progress_task(f"Evaluating {split}", len(ds)) as advance:
                values = model.evaluate(ds, verbose=0, return_dict=True, callbacks=[_BatchProgress(advance)])
            metrics[f"{prefix}loss"] = float(values["loss"])
            metrics[f"{prefix}accuracy"] = float(values["accuracy"])
    if "val_accuracy" in metrics:
        say(f"[bold green]validation accuracy {metrics['val_accuracy']:.2%}[/]"
            + (f", test accuracy {metrics['test_accuracy']:.2%}" if "test_accuracy" in metrics else ""))
    return metrics


def _write_history(history: dict[str, list[float]], path: Path) -> None:
    from cnnkit.data.dataset import atomic_write_rows

    keys = list(history)
    epochs = len(history.get("loss", []))
    rows = [[epoch + 1] + [history[k][epoch] if epoch < len(history[k]) else "" for k in keys] for epoch in range(epochs)]
    atomic_write_rows(path, ["epoch", *keys], rows)


def versions() -> dict[str, str]:
    """Versions of cnnkit, Keras, the backend and Python, as stored in run.json."""
    backend = keras.backend.backend()
    try:
        module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy"}[backend]
        backend_version = __import__(module).__version__
    except (KeyError, ImportError):
        backend_version = "unknown"
    return {"cnnkit": __version__, "keras": keras.__version__, "backend": backend,
            "backend_version": backend_version, "python": platform.python_version(), "numpy": np.__version__}


def _run_record(cfg: RunConfig, data: LoadedData, data_dir: Path, metrics: dict[str, Any], warnings: list[str],
                status: str, seconds: float, epochs_run: int) -> dict[str, Any]:
    from cnnkit.models import augmentation_layers

    augmentation = [layer.get_config() for layer in augmentation_layers(cfg.train.augment)]
    return {
        "status": status,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_dir": str(data_dir.resolve()),
        "config": cfg.to_dict(),
        "model": cfg.model.name,
        "class_names": data.class_names,
        "num_classes": len(data.class_names),
        "image_size": list(cfg.data.image_size),
        "color_mode": cfg.data.color_mode,
        "resize_mode": cfg.data.resize_mode,
        "data_hash": data.data_hash,
        "split_sizes": data.split_sizes(),
        "split_source": data.folder.split_source,
        "class_counts": {s: data.class_counts(s) for s, n in data.split_sizes().items() if n},
        "skipped": len(data.skipped),
        "augmentation": {"preset": cfg.train.augment, "layers": augmentation},
        "versions": versions(),
        "metrics": metrics,
        "epochs_run": epochs_run,
        "train_seconds": round(seconds, 1),
        "warnings": warnings,
    }


def read_history(path: Path) -> dict[str, list[float]]:
    """history.csv -> {metric: [value per epoch]}."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    keys = [k for k in (rows[0] if rows else {}) if k != "epoch"]
    return {k: [float(r[k]) for r in rows if r[k] != ""] for k in keys}


from cnnkit._callable import make_module_callable  # noqa: E402

make_module_callable(__name__, train)
