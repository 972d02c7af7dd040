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

import csv
import dataclasses
import datetime as _dt
import platform
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnnkit._progress import esc, progress_task, say, warn
from cnnkit._rundir import RunDirectory, read_json, write_json
from cnnkit._version import __version__
from cnnkit.config import DataConfig, ModelConfig, RunConfig, TrainConfig, config_from_dict
from cnnkit.data.batches import ArrayBatches
from cnnkit.data.dataset import LoadedData, load_image_folder, write_skipped_csv, write_split_csv
from cnnkit.errors import ConfigError, DataError, ModelError, RunNotFoundError
from cnnkit.fitting import (
    DECAYING_SCHEDULES,
    Fitter,
    Phase,
    TimeBudget,
    build_for_training,
    make_batches,
    plan_phases,
    precision_policy,
    reestimate_batchnorm,
)
from cnnkit.lr_find import find_learning_rate
from cnnkit.models import get_spec
from cnnkit.models.saving import ModelMeta, as_float32, save_model
from cnnkit.optim import balanced_class_weight

# Classes with fewer training images than this get a warning: below ~10 per class, validation
# accuracy swings by 10 points or more from one image, and the model cannot learn the class.
MIN_IMAGES_PER_CLASS = 10

# Flat keyword names accepted by train(**options), mapped to their config section.
# Every field of every section, plus "model" for the model's name.
_OPTION_SECTIONS = {
    **{f.name: section for section, cls in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig))
       for f in dataclasses.fields(cls) if f.name != "name"},
    "model": "model",
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
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    config: RunConfig | dict | None = None,
    *,
    overwrite: bool = False,
    cache_root: Path | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    resume: str | Path | None = None,
    **options: Any,
) -> TrainResult:
    """Train a classifier on a folder of images and write a run directory.

    With a pre-trained backbone, phase 1 trains the new head on the frozen backbone for
    ``epochs``; phase 2 (``fine_tune_epochs`` > 0) unfreezes its top ``fine_tune_layers`` and
    trains on at ``fine_tune_lr``. ``history.csv`` holds both phases (``phase`` column).

    Args:
        data_dir: ``root/<class>/*.jpg``, or ``root/train/<class>/`` with optional
            ``validation/`` (``val/``) and ``test/``. With ``resume``, defaults to the run's own.
        out: the run directory to write (default ``runs/<model>-<timestamp>``; with ``resume``,
            the resumed run itself, replaced when the continuation is written).
        config: a RunConfig (or nested dict); ``options`` override it.
        overwrite: replace an existing run directory.
        cache_root: where decoded images are cached (default ``$CNNKIT_HOME/cache``).
        callbacks: extra Keras callbacks for ``fit`` (after cnnkit's own).
        resume: a run directory to continue from its ``last.keras`` (model and optimizer state)
            with its own config; ``epochs`` then means how many more epochs (default: what an
            interrupted run had left).
        **options: any config field by its flat name: ``model``, ``weights``, ``epochs``,
            ``batch_size``, ``learning_rate``, ``augment``, ``fine_tune_epochs``, ``image_size``, ...

    Returns:
        A TrainResult.

    Raises:
        DataError: the folder is unusable (named in the message).
        ModelError: unknown model name (valid names listed), unusable ``weights``.
        ConfigError: an invalid setting, or fine-tuning without a pre-trained backbone.
        RunExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> result = cnnkit.train("dataset", out="runs/first", model="simple", epochs=10)
        >>> result.metrics["val_accuracy"]
    """
    if resume is not None:
        return _resume(Path(resume), data_dir, out, cache_root, list(callbacks or []), options)
    if data_dir is None:
        raise DataError("train() needs data_dir, the image folder (or resume=RUN to continue a run).")
    cfg = resolve_config(config, **options)
    spec = get_spec(cfg.model.name)  # fail fast on a wrong name, before any decoding
    _check_plan(cfg, spec)
    if cfg.data.image_size is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=spec.default_image_size))
    out = Path(out) if out is not None else Path("runs") / f"{cfg.model.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    run = RunDirectory(out, overwrite=overwrite)
    try:
        return _train_into(run, Path(data_dir), cfg, cache_root, list(callbacks or []))
    except BaseException:
        run.discard()
        raise


def _check_plan(cfg: RunConfig, spec: Any) -> None:
    if not cfg.train.fine_tune_epochs:
        return
    if not spec.is_backbone:
        raise ConfigError(
            f"[train] fine_tune_epochs needs a pre-trained backbone (mobilenetv2, efficientnetb0, resnet50); "
            f"'{spec.name}' trains from scratch in --epochs. Received: model={spec.name!r}, "
            f"fine_tune_epochs={cfg.train.fine_tune_epochs}")
    if cfg.model.weights == "none":
        raise ConfigError(
            "[train] with weights = 'none' the backbone is random and trains from the start in --epochs; there is "
            "nothing pre-trained to fine-tune. Use --weights imagenet or PATH, or drop --fine-tune-epochs. "
            f"Received: weights='none', fine_tune_epochs={cfg.train.fine_tune_epochs}")


@dataclass
class _ResumePoint:
    model: keras.Model
    history: dict[str, list[float]]
    plan: list[Phase]
    resumed_from: dict[str, Any]


def _train_into(run: RunDirectory, data_dir: Path, cfg: RunConfig, cache_root: Path | None,
                extra_callbacks: list[keras.callbacks.Callback], resume: _ResumePoint | None = None) -> TrainResult:
    started = time.time()
    deadline = time.monotonic() + cfg.train.time_budget if cfg.train.time_budget else None
    data = load_image_folder(data_dir, cfg.data, cache_root=cache_root)
    write_skipped_csv(data.skipped, run.path / "skipped.csv")
    write_split_csv(data, run.path / "split.csv")
    warnings = _report_data(data, run.final)

    if cfg.model.name == "fast" and cfg.model.width == "auto" and resume is None:
        cfg = _resolve_fast_width(cfg, data, deadline)
    keras.utils.set_random_seed(cfg.data.seed)
    train_ds, val_ds = make_batches(data, cfg)
    monitor = "val_loss" if val_ds is not None else "loss"
    if val_ds is None:
        warnings.append(_warn("No validation images: EarlyStopping and the checkpoint follow the training loss, "
                              "which cannot show overfitting. Keep val_split > 0 or add a validation/ folder."))
    policy = precision_policy(cfg.train.mixed_precision)
    extra: dict[str, Any] = {"dtype_policy": policy}
    if resume is not None:
        model, plan, extra["resumed_from"] = resume.model, resume.plan, resume.resumed_from
    else:
        model = build_for_training(cfg, len(data.class_names), policy)
        learning_rate = cfg.train.learning_rate
        if learning_rate == "auto":
            probe = build_for_training(cfg, len(data.class_names), policy)  # a throw-away copy
            learning_rate = find_learning_rate(probe, train_ds, cfg.train).suggested
            say(f"learning rate (range test): [bold]{learning_rate:.2g}[/]")
            extra["learning_rate_found"] = learning_rate
        plan = plan_phases(cfg, learning_rate)
    class_weight = None
    if cfg.train.class_weight == "auto":
        class_weight = balanced_class_weight(data.split_rows("train")[1], len(data.class_names))
        extra["class_weight"] = {data.class_names[c]: round(w, 4) for c, w in class_weight.items()}

    if deadline is not None:
        plan = [Phase(1, _BUDGET_MAX_EPOCHS, plan[0].learning_rate)]
    fitter = Fitter(model, cfg, run.path, train_ds, val_ds, monitor, class_weight, extra_callbacks,
                     resume.history if resume else None, total_epochs=sum(p.epochs for p in plan))
    if deadline is not None:
        fitter.budget = _time_budget(deadline, plan[0].learning_rate, data, cfg)
        say(f"time budget {_clock(cfg.train.time_budget)}: {_clock(fitter.budget.remaining())} left for training "
            f"after decoding")
    status = "completed"
    for phase in plan:
        if phase.number == 2 and phase.learning_rate is not None:
            refusal = fitter.head_not_trained(len(data.class_names))
            if refusal and not cfg.train.force:
                warnings.append(_warn(refusal))
                break
        status = fitter.fit(phase)
        if status != "completed":
            break
    if status != "completed" or (cfg.train.schedule not in DECAYING_SCHEDULES and deadline is None):
        fitter.restore_best()  # a run annealed to a rate of ~0 keeps its final weights
    if status == "completed":
        # Moving statistics lag behind fast-moving weights: recompute them for the final model.
        extra["batchnorm_reestimated_on"] = reestimate_batchnorm(model, _plain_train_batches(data, cfg))
    model = as_float32(model)  # the saved model computes in float32 on any machine
    history = fitter.recorder.history
    extra["phases"] = fitter.phases
    if fitter.budget is not None:
        extra["time_budget"] = {"seconds": cfg.train.time_budget, "training_seconds": round(
            time.monotonic() - fitter.budget.started, 1) if fitter.budget.started else 0.0,
            "steps": fitter.budget.steps}
    metrics = _final_metrics(model, data, cfg, history, monitor)
    warnings += [_warn(m) for m in diagnose_history(history, len(data.class_names), cfg.train.overfit_gap)]
    meta = ModelMeta(data.class_names, cfg.data.image_size, cfg.data.color_mode, cfg.data.resize_mode,
                     cfg.model.name, max_pixels=cfg.data.max_pixels)
    save_model(model, run.path / "model.keras", meta)
    _write_history(history, run.path / "history.csv")
    if history.get("loss"):
        from cnnkit.plots import plot_curves

        plot_curves(history, run.path / "curves.png")
    record = _run_record(cfg, data, data_dir, metrics, warnings, status, time.time() - started,
                         len(history.get("loss", [])))
    record.update(extra)
    write_json(run.path / "run.json", record)
    run_dir = run.commit()
    return TrainResult(run_dir, model, data.class_names, history, metrics, data.data_hash, warnings, status)


def _resume(run_dir: Path, data_dir: str | Path | None, out: str | Path | None, cache_root: Path | None,
            extra_callbacks: list[keras.callbacks.Callback], options: dict[str, Any]) -> TrainResult:
    """Continue ``run_dir`` from its ``last.keras`` (model + optimizer state) with its own config."""
    if not (run_dir / "run.json").is_file():
        raise RunNotFoundError(f"No run.json in '{run_dir}': --resume takes a run directory written by 'cnnkit train'.")
    if not (run_dir / "last.keras").is_file():
        raise ModelError(f"'{run_dir}' has no last.keras checkpoint to resume from (it was written before cnnkit kept "
                         "one, or the run was cut off before its first epoch ended). Start a new run instead.")
    unexpected = sorted(set(options) - {"epochs"})
    if unexpected:
        raise ConfigError(f"A resumed run keeps its own config; only epochs (how many more) can be given. "
                          f"Received: {', '.join(unexpected)}")
    record = read_json(run_dir / "run.json")
    cfg = config_from_dict(record["config"])
    if cfg.train.time_budget:
        raise ConfigError(f"Run '{run_dir}' was trained to a time budget, whose schedule cannot be continued: start a "
                          "new run (--time-budget) instead. Received: resume with time_budget="
                          f"{cfg.train.time_budget:g}")
    history = read_history(run_dir / "history.csv")
    phase = int(history["phase"][-1]) if history.get("phase") else 1
    done = sum(1 for p in history.get("phase", [1] * len(history.get("loss", []))) if int(p) == phase)
    planned = cfg.train.epochs if phase == 1 else cfg.train.fine_tune_epochs
    interrupted = record.get("status") == "interrupted"
    more = options.get("epochs") or (planned - done if interrupted else 0)
    plan = [Phase(phase, more, None)] if more > 0 else []
    if phase == 1 and interrupted and cfg.train.fine_tune_epochs:
        plan.append(Phase(2, cfg.train.fine_tune_epochs, cfg.train.phase2_learning_rate))
    if not plan:
        raise ConfigError(f"Run '{run_dir}' completed its {len(history.get('loss', []))} epochs; pass --epochs N to "
                          "train N more. Received: epochs=None")
    try:
        model = keras.saving.load_model(run_dir / "last.keras", compile=True)
    except Exception as exc:
        raise ModelError(f"Cannot load '{run_dir / 'last.keras'}' to resume: {exc}") from exc
    say(f"resuming '{run_dir}' at epoch {len(history.get('loss', [])) + 1} (phase {phase}, optimizer step "
        f"{int(keras.ops.convert_to_numpy(model.optimizer.iterations))})")
    out = Path(out) if out is not None else run_dir
    run = RunDirectory(out, overwrite=True)
    try:
        for name in ("best.weights.h5", "last.keras"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, run.path / name)
        resumed = {"run": str(run_dir), "epochs_before": len(history.get("loss", [])), "phase": phase}
        point = _ResumePoint(model, history, plan, resumed)
        return _train_into(run, Path(data_dir or record["data_dir"]), cfg, cache_root, extra_callbacks, point)
    except BaseException:
        run.discard()
        raise


# Under a time budget, epochs are not planned: training stops when the budget is spent.
_BUDGET_MAX_EPOCHS = 100_000
_BATCHNORM_IMAGES = 10_000


def _resolve_fast_width(cfg: RunConfig, data: LoadedData, deadline: float | None) -> RunConfig:
    """``fast``'s width: medium, or what the time left after decoding affords per training image."""
    from cnnkit.models.fast import DEFAULT_WIDTH, width_for_budget

    width = DEFAULT_WIDTH
    if deadline is not None:
        width = width_for_budget(deadline - time.monotonic(), len(data.split_rows("train")[0]), cfg.data.image_size)
        say(f"model width for this budget: [bold]{width}[/] (--width to choose)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=width))


def _plain_train_batches(data: LoadedData, cfg: RunConfig) -> ArrayBatches:
    """Shuffled training batches without augmentation (for the BatchNorm statistics)."""
    rows, labels = data.split_rows("train")
    return ArrayBatches(data.cache.images, rows, labels, max(cfg.train.batch_size, 256), shuffle=True,
                        seed=cfg.data.seed + 1)


def _time_budget(deadline: float, learning_rate: float, data: LoadedData, cfg: RunConfig) -> TimeBudget:
    """The budget callback; what runs after training is estimated from the first validation pass."""
    views = 2 if _flip_tta(cfg) else 1
    held_out = sum(len(data.split_rows(s)[0]) for s in ("validation", "test"))
    after = held_out * views + min(_BATCHNORM_IMAGES, len(data.split_rows("train")[0]))
    budget = TimeBudget(deadline, learning_rate, reserve=0.05 * cfg.train.time_budget + 5, after_training_images=after,
                        validation_images=len(data.split_rows("validation")[0]))
    if budget.remaining() < 0.2 * cfg.train.time_budget:
        raise ConfigError(
            f"--time-budget {_clock(cfg.train.time_budget)} is spent before training starts (decoding took "
            f"{_clock(cfg.train.time_budget - (deadline - time.monotonic()))}): give a larger budget. The decoded images "
            f"are cached, so a second run starts sooner. Received: time_budget={cfg.train.time_budget:g}")
    return budget


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _flip_tta(cfg: RunConfig) -> bool:
    """Flip test-time augmentation is reported when training flipped the images."""
    from cnnkit.models.augment import augment_config

    return any(step.get("layer") == "RandomFlip" or step.get("flip") not in (None, "none")
               for step in augment_config(cfg.train.augment))


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


def diagnose_history(history: dict[str, list[float]], num_classes: int, overfit_gap: float = 0.15) -> list[str]:
    """The classic training mistakes, in words, from per-epoch metrics.

    * overfitting: validation accuracy trails training accuracy by more than ``overfit_gap`` at the
      end, with the epoch where the gap first opened;
    * accuracy stuck near chance (1/num_classes): labels or inputs are broken;
    * training loss not falling (or NaN) in the first epochs: the learning rate is too high or
      too low, told apart by the loss rising and by the rate itself (the ``learning_rate`` column).
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
    found += _learning_rate_hints(loss, history.get("learning_rate", []))
    return found


def _learning_rate_hints(loss: list[float], rates: list[float]) -> list[str]:
    """Loss not falling in the first epochs, read as a learning rate too high or too low."""
    first = loss[:3]
    rate = rates[0] if rates else None
    at = f" (learning rate {rate:.2g})" if rate else ""
    bad = next((i for i, value in enumerate(loss) if not np.isfinite(value)), None)
    if bad is not None:
        return [f"Training loss became {loss[bad]} at epoch {bad + 1}{at}: the learning rate is far too high (or "
                "float16 overflowed). Lower it 10x, or find one with 'cnnkit lr-find' / --lr auto."]
    if len(first) < 3 or min(first[1:]) < first[0] * 0.98:
        return []
    rising = first[-1] > first[0] * 1.02
    if rate is not None and rate <= 1e-5:  # too small a step to make the loss rise: noise
        cause = "the learning rate is probably too low: try 10x higher"
    elif rising or (rate is not None and rate >= 1e-2):
        cause = "the learning rate is probably too high: try 10x lower"
    else:
        cause = "the learning rate may be too high or too low (or the data too hard for this model)"
    return [f"Training loss did not fall in the first {len(first)} epochs ({first[0]:.3f} -> {first[-1]:.3f}"
            f"{', rising' if rising else ''}){at}: {cause}, or run 'cnnkit lr-find' (--lr auto)."]


def _final_metrics(model: keras.Model, data: LoadedData, cfg: RunConfig, history: dict[str, list[float]],
                   monitor: str) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if history.get(monitor):
        best = int(np.argmin(history[monitor]))
        metrics["best_epoch"] = best + 1
        metrics["epochs_run"] = len(history[monitor])
        metrics["train_accuracy"] = history["accuracy"][best]
        metrics["train_loss"] = history["loss"][best]
    tta = _flip_tta(cfg)
    for split, prefix in (("validation", "val_"), ("test", "test_")):
        rows, labels = data.split_rows(split)
        if len(rows):
            ds = ArrayBatches(data.cache.images, rows, labels, max(cfg.train.batch_size, 256))
            probs, flipped = _predict_batches(model, ds, f"Evaluating {split}", tta)
            metrics[f"{prefix}loss"] = _cross_entropy(probs, labels)
            metrics[f"{prefix}accuracy"] = float(np.mean(probs.argmax(axis=1) == labels))
            if flipped is not None:
                averaged = (probs + flipped) / 2
                metrics[f"{prefix}accuracy_tta"] = float(np.mean(averaged.argmax(axis=1) == labels))
    if "val_accuracy" in metrics:
        def shown(prefix: str) -> str:
            text = f"{metrics[prefix + 'accuracy']:.2%}"
            return text + (f" ({metrics[prefix + 'accuracy_tta']:.2%} with flip TTA)" if prefix + "accuracy_tta" in metrics
                           else "")

        say(f"[bold green]validation accuracy {shown('val_')}[/]"
            + (f", test accuracy {shown('test_')}" if "test_accuracy" in metrics else ""))
    return metrics


def _predict_batches(model: keras.Model, batches: ArrayBatches, title: str,
                     flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities of every batch (and of its mirror image when ``flip``)."""
    plain, mirrored = [], []
    with progress_task(title + (" (and mirrored)" if flip else ""), len(batches)) as advance:
        for index in range(len(batches)):
            images = batches[index][0]
            plain.append(np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(images)), dtype=np.float64))
            if flip:
                mirror = np.ascontiguousarray(images[:, :, ::-1])
                mirrored.append(np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(mirror)),
                                           dtype=np.float64))
            advance(1)
    return np.concatenate(plain), (np.concatenate(mirrored) if flip else None)


def _cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of the true classes (no label smoothing: what the model really scores)."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))


def _write_history(history: dict[str, list[float]], path: Path) -> None:
    from cnnkit.data.dataset import atomic_write_rows

    keys = list(history)
    epochs = len(history.get("loss", []))
    def cell(key: str, epoch: int) -> Any:
        if epoch >= len(history[key]):
            return ""
        return int(history[key][epoch]) if key == "phase" else history[key][epoch]

    rows = [[epoch + 1] + [cell(k, epoch) for k in keys] for epoch in range(epochs)]
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
    from cnnkit.models.augment import augment_config

    augmentation = augment_config(cfg.train.augment)
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
