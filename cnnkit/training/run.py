"""Training stage: a folder of images -> a run directory (model, config, history, curves, manifests).

``train()`` scans and decodes the folder (``cnnkit.data``), builds a model from the zoo
(``cnnkit.models``), fits it in phases (``cnnkit.training.fitting``: EarlyStopping or a decaying
schedule, the best-validation checkpoint, ``last.keras`` for resume) and writes the run directory
atomically (``cnnkit.rundir``):

    model.keras   raw uint8 pixels in, class probabilities out; class names inside the file
    run.json      every setting, class names, image size, colour mode, data hash, split sizes,
                  augmentation, versions, final metrics, warnings, status
    history.csv   per-epoch metrics        curves.png   accuracy and loss, train vs validation
    split.csv     path,class,split,sha256  skipped.csv  path,reason of every file left out

Ctrl-C stops training early but still writes the run (best checkpoint, ``status: interrupted``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnnkit._backends import require_gradients
from cnnkit._progress import esc, progress_task, say, warn
from cnnkit._version import __version__
from cnnkit.config import PRETRAINED_DEFAULT, PRETRAINED_MODULE, RunConfig, photo_model_choice, resolve_config
from cnnkit.data.batches import ArrayBatches, tta_views
from cnnkit.data.builtin import data_folder
from cnnkit.data.dataset import LoadedData, load_image_folder, split_rows, write_skipped_csv
from cnnkit.data.scan import typical_image_size
from cnnkit.errors import CnnkitError, ConfigError, DataError
from cnnkit.metrics import cross_entropy
from cnnkit.models import get_spec
from cnnkit.models.augment import augment_config, final_tta
from cnnkit.models.fast import DEFAULT_WIDTH, without_progressive
from cnnkit.models.zoo import backbone_names
from cnnkit.models.saving import ModelMeta, as_float32, save_model
from cnnkit.rundir import (
    HISTORY_CSV,
    MODEL_FILE,
    RUN_JSON,
    SKIPPED_CSV,
    SPLIT_CSV,
    RunDirectory,
    write_history,
    write_json,
    write_split_csv,
)
from cnnkit.training.budget import (
    BUDGET_MAX_EPOCHS,
    TRANSFER_UPSCALE,
    BudgetPlan,
    clock,
    make_time_budget,
    plan_budget,
)
from cnnkit.training.diagnostics import data_warnings, diagnose_history
from cnnkit.training.distribute import Devices, distributed, single_device_copy, synchronize_batchnorm
from cnnkit.training.fitting import (
    DECAYING_SCHEDULES,
    Fitter,
    Phase,
    build_for_training,
    make_batches,
    plan_phases,
    reestimate_batchnorm,
)
from cnnkit.training.optim import balanced_class_weight
from cnnkit.training.precision import Precision, choose_precision
from cnnkit.training.range_test import find_learning_rate
from cnnkit.training.resume import ResumePoint, copy_checkpoints, prepare_resume, resume_config


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


def train(
    data_dir: str | Path | None = None,
    out: str | Path | None = None,
    config: RunConfig | dict | None = None,
    *,
    overwrite: bool = False,
    cache_root: Path | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    resume: str | Path | None = None,
    budget_started: float | None = None,
    **options: Any,
) -> TrainResult:
    """Train a classifier on a folder of images and write a run directory.

    With a pre-trained backbone, phase 1 trains the new head on the frozen backbone for
    ``epochs``; phase 2 (``fine_tune_epochs`` > 0) unfreezes its top ``fine_tune_layers`` and
    trains on at ``fine_tune_lr``. ``history.csv`` holds both phases (``phase`` column).

    Args:
        data_dir: ``root/<class>/*.jpg``, or ``root/train/<class>/`` with optional
            ``validation/`` (``val/``) and ``test/``; or a built-in set's name, ``"cifar10"``
            (``cnnkit.data.builtin``). With ``resume``, defaults to the run's own.
        out: the run directory to write (default ``runs/<model>-<timestamp>``; with ``resume``,
            the resumed run itself, replaced when the continuation is written).
        config: a RunConfig (or nested dict); ``options`` override it.
        overwrite: replace an existing run directory.
        cache_root: where decoded images are cached (default ``$CNNKIT_HOME/cache``).
        callbacks: extra Keras callbacks for ``fit`` (after cnnkit's own).
        resume: a run directory to continue from its ``last.keras`` (model and optimizer state)
            with its own config; ``epochs`` then means how many more epochs (default: what an
            interrupted run had left). Other options that would change the run are refused.
        budget_started: the ``time.monotonic()`` a ``time_budget`` counts from (default: this call).
            ``cnnkit train`` passes the moment it started, so its budget covers start-up too.
        **options: any config field by its flat name: ``model``, ``weights``, ``epochs``,
            ``batch_size``, ``learning_rate``, ``augment``, ``fine_tune_epochs``, ``image_size``,
            ``devices`` (data-parallel over N devices, or "all"; see ``cnnkit.training.distribute``), ...

    Returns:
        A TrainResult.

    Raises:
        DataError: the folder is unusable (named in the message).
        ModelError: unknown model name (valid names listed), unusable ``weights``.
        ConfigError: an invalid setting, or fine-tuning without a pre-trained backbone.
        RunExistsError: ``out`` exists and ``overwrite`` is False.

    Example:
        >>> result = cnnkit.train("dataset", out="runs/first", model="simple", epochs=10, overwrite=True)
        >>> accuracy = result.metrics["val_accuracy"]
    """
    budget_started = time.monotonic() if budget_started is None else budget_started  # this call, folder scan included
    require_gradients("train")
    if resume is not None:
        resumed_cfg = resume_config(Path(resume), options)
        with contextlib.ExitStack() as scope:
            devices = scope.enter_context(distributed(resumed_cfg.train.devices, resumed_cfg.train.batch_size))
            point = prepare_resume(Path(resume), options)  # inside the scope: the model loads onto the devices
            with RunDirectory(Path(out) if out is not None else Path(resume), overwrite=True, resuming=True) as run:
                copy_checkpoints(point.source, run.path)
                folder = data_folder(data_dir) if data_dir else Path(point.data_dir)
                return _train_into(run, folder, point.config, cache_root, list(callbacks or []),
                                   _Devices(devices, scope.close), point)
    if data_dir is None:
        raise DataError("train() needs data_dir, the image folder (or resume=RUN to continue a run).")
    cfg = resolve_config(config, **options)
    data_dir = data_folder(data_dir)  # a built-in set's name (cifar10): its folder, written on first use
    cfg = _look_at_the_images(cfg, data_dir, config, options)
    choice = _model_choice(cfg)
    spec = get_spec(cfg.model.name)  # fail fast on a wrong name, before any decoding
    _check_plan(cfg, spec)
    if cfg.data.image_size is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=spec.default_image_size))
    out = Path(out) if out is not None else Path("runs") / f"{cfg.model.name}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    transfer = _transfer_alternative(cfg, config, options)
    with contextlib.ExitStack() as scope:
        devices = scope.enter_context(distributed(cfg.train.devices, cfg.train.batch_size))
        with RunDirectory(out, overwrite=overwrite) as run:
            return _train_into(run, data_dir, cfg, cache_root, list(callbacks or []),
                               _Devices(devices, scope.close), model_choice=choice, transfer=transfer,
                               budget_started=budget_started)


def _transfer_alternative(cfg: RunConfig, config: RunConfig | dict | None, options: dict[str, Any]) -> RunConfig | None:
    """Under --time-budget with no --model, transfer learning weighed against fast (when installed)."""
    import importlib.util

    if not cfg.model_choice or cfg.model.name != "fast" or cfg.train.time_budget is None \
            or isinstance(config, RunConfig) or importlib.util.find_spec(PRETRAINED_MODULE) is None:
        return None
    if any(key in options for key in ("width", "stem", "init", "progressive")) or cfg.train.devices not in (1, "1"):
        return None
    try:
        transfer = resolve_config(config, **{**options, "model": PRETRAINED_DEFAULT,
                                             "image_size": cfg.data.image_size, "upscale_size": TRANSFER_UPSCALE})
    except CnnkitError:
        return None
    return dataclasses.replace(transfer, model_choice=cfg.model_choice)


@dataclass
class _Devices:
    """The devices of a run, and how to leave their scope once fitting is over."""

    devices: Devices
    leave: Callable[[], None]


def _look_at_the_images(cfg: RunConfig, data_dir: Path, config: RunConfig | dict | None,
                        options: dict[str, Any]) -> RunConfig:
    """With no --model and no --image-size, photos (over 64 px) get transfer learning when installed."""
    if not cfg.model_choice or cfg.data.image_size is not None or isinstance(config, RunConfig) \
            or (config or {}).get("data", {}).get("image_size") is not None:
        return cfg
    typical = typical_image_size(data_dir)
    choice = photo_model_choice(typical) if typical else None
    if choice is None:
        return cfg
    return dataclasses.replace(resolve_config(config, **options, model=choice[0]), model_choice=choice[1])


def _model_choice(cfg: RunConfig) -> str:
    """Why this model (run.json's ``model_choice``): named by the user, or cnnkit's default and why."""
    if not cfg.model_choice:
        return f"named: --model {cfg.model.name}"
    say(f"model: [bold]{esc(cfg.model.name)}[/] ({esc(cfg.model_choice)})")
    return cfg.model_choice


def _check_plan(cfg: RunConfig, spec: Any) -> None:
    if not cfg.train.fine_tune_epochs:
        return
    if not spec.is_backbone:
        raise ConfigError(
            f"[train] fine_tune_epochs needs a pre-trained backbone ({', '.join(backbone_names())}); "
            f"'{spec.name}' trains from scratch in --epochs. Received: model={spec.name!r}, "
            f"fine_tune_epochs={cfg.train.fine_tune_epochs}")
    if cfg.model.weights == "none":
        raise ConfigError(
            "[train] with weights = 'none' the backbone is random and trains from the start in --epochs; there is "
            "nothing pre-trained to fine-tune. Use --weights imagenet or PATH, or drop --fine-tune-epochs. "
            f"Received: weights='none', fine_tune_epochs={cfg.train.fine_tune_epochs}")


@dataclass
class _Plan:
    """A model ready to fit, the phases to run, and what run.json records about them."""

    cfg: RunConfig
    model: keras.Model
    phases: list[Phase]
    extra: dict[str, Any]
    history: dict[str, list[float]] | None = None


def _train_into(run: RunDirectory, data_dir: Path, cfg: RunConfig, cache_root: Path | None,
                extra_callbacks: list[keras.callbacks.Callback], devices: _Devices,
                resume: ResumePoint | None = None, model_choice: str | None = None,
                transfer: RunConfig | None = None, budget_started: float | None = None) -> TrainResult:
    started = time.time()
    counted_from = time.monotonic() if budget_started is None else budget_started
    deadline = counted_from + cfg.train.time_budget if cfg.train.time_budget else None
    data = load_image_folder(data_dir, cfg.data, cache_root=cache_root)
    write_skipped_csv(data.skipped, run.path / SKIPPED_CSV)
    write_split_csv(run.path / SPLIT_CSV, split_rows(data))
    _describe_data(data, run.final)
    warnings = [_warn(message) for message in data_warnings(data, cfg.train.class_weight == "auto")
                + _split_options_unused(cfg, data)]
    train_ds, val_ds = make_batches(data, cfg, devices.devices.count)
    precision = choose_precision(cfg.train.mixed_precision)
    budget_plan: BudgetPlan | None = None
    if deadline is not None:  # measure this machine: the speed decides the width and prices the final work
        named = cfg.model.name
        cfg, budget_plan = plan_budget(cfg, data, train_ds, precision.policy, deadline, transfer)
        if cfg.model.name != named:  # the budget chose transfer learning: its own batches and recipe,
            # in the precision its speed was measured in (run.json's mixed_precision says so too)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=precision.requested))
            train_ds, val_ds = make_batches(data, cfg, devices.devices.count)
            model_choice = f"{model_choice}; under --time-budget: {budget_plan.approach['rule']}"
    if cfg.model.name == "fast" and cfg.model.width == "auto":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=DEFAULT_WIDTH))
    keras.utils.set_random_seed(cfg.data.seed)  # after any probe: the same model whether one ran or not
    if val_ds is None:
        warnings.append(_warn("No validation images: EarlyStopping and the checkpoint follow the training loss, "
                              "which cannot show overfitting. Keep val_split > 0 or add a validation/ folder."))
    # A fallback is said, not warned: fast's recipe asks for mixed precision, so every default run on
    # a CPU without bfloat16 falls back, and that is no problem to fix (run.json keeps the reason).
    if precision.requested:
        say(f"precision: [bold]{precision.policy}[/] ({esc(precision.reason)})" if not precision.fell_back else
            f"[yellow]precision: float32, not mixed[/]: {esc(precision.reason)}")
    plan = _plan(cfg, data, train_ds, resume, precision)
    plan.extra["devices"] = devices.devices.record()
    if model_choice is not None:
        plan.extra["model_choice"] = model_choice
    synchronize_batchnorm(plan.model, devices.devices, True)
    if devices.devices.count > 1:
        say(f"training on {devices.devices.count} {devices.devices.kind} devices ({devices.devices.strategy}): "
            f"{cfg.train.batch_size // devices.devices.count} images per device per step")
    # Written now, so a run killed at any moment can be resumed from its partial folder.
    write_json(run.path / RUN_JSON, {**_run_record(cfg, data, data_dir, {}, warnings, "running", 0.0, 0), **plan.extra})
    monitor = "val_loss" if val_ds is not None else "loss"
    fitter = Fitter(plan.model, cfg, run.path, train_ds, val_ds, monitor, _class_weight(cfg, data, plan.extra),
                    extra_callbacks, plan.history, total_epochs=sum(p.epochs for p in plan.phases))
    if budget_plan is not None:
        plan.phases = [Phase(1, BUDGET_MAX_EPOCHS, plan.phases[0].learning_rate)]
        one_device = devices.devices.count == 1  # the float32 copy is timed outside any distribution
        fitter.budget = make_time_budget(deadline, plan.phases[0].learning_rate, cfg, budget_plan,
                                         plan.model if one_device else None, train_ds)
        say(f"time budget {clock(cfg.train.time_budget)}: {clock(fitter.budget.remaining())} for training, "
            f"{clock(fitter.budget.reserve)} kept for the final evaluation and saving")
    status = _fit_phases(fitter, plan.phases, len(data.class_names), cfg, warnings)
    marks = {"fit_returned": time.monotonic()}  # where the time after training goes (run.json, under a budget)
    synchronize_batchnorm(plan.model, devices.devices, False)
    devices.leave()  # the final metrics and the saved model are computed on one device
    if devices.devices.count > 1:
        plan.model = fitter.model = single_device_copy(plan.model)
    model = _final_model(fitter, plan, data, cfg, status, deadline)
    marks["final_model"] = time.monotonic()
    history = fitter.recorder.history
    metrics = _final_metrics(model, data, cfg, history, monitor)
    marks["evaluated"] = time.monotonic()
    warnings += [_warn(m) for m in diagnose_history(history, len(data.class_names), cfg.train.overfit_gap)]
    _save_outputs(run, model, data, cfg, history)
    record = _run_record(cfg, data, data_dir, metrics, warnings, status, time.time() - started,
                         len(history.get("loss", [])))
    if fitter.budget is not None:  # did the budget hold? (run.json is the last write)
        finished = time.monotonic() - counted_from
        plan.extra["time_budget"]["finished_at_s"] = round(finished, 1)
        # on the budget's clock: fit returned (its iterators freed), final model ready (BatchNorm
        # re-estimated), final metrics computed; then saving until finished_at_s
        plan.extra["time_budget"]["after_training_at_s"] = {k: round(t - counted_from, 1) for k, t in marks.items()}
        say(f"time budget {clock(cfg.train.time_budget)}: finished at {clock(finished)}")
    write_json(run.path / RUN_JSON, {**record, **plan.extra})
    return TrainResult(run.commit(), model, data.class_names, history, metrics, data.data_hash, warnings, status)


def _plan(cfg: RunConfig, data: LoadedData, train_ds: ArrayBatches, resume: ResumePoint | None,
          precision: Precision) -> _Plan:
    """The model and phases: from the resume checkpoint, or built new (after the range test for --lr auto)."""
    policy = precision.policy
    extra: dict[str, Any] = {"dtype_policy": policy, "precision": precision.as_dict()}
    if resume is not None:
        extra["resumed_from"] = resume.resumed_from
        return _Plan(cfg, resume.model, resume.plan, extra, resume.history)
    model = build_for_training(cfg, len(data.class_names), policy, data)
    learning_rate = cfg.train.learning_rate
    if learning_rate == "auto":
        probe = build_for_training(cfg, len(data.class_names), policy, data)  # a throw-away copy
        learning_rate = find_learning_rate(probe, train_ds, cfg.train).suggested
        say(f"learning rate (range test): [bold]{learning_rate:.2g}[/]")
        extra["learning_rate_found"] = learning_rate
    return _Plan(cfg, model, plan_phases(cfg, learning_rate), extra)


def _class_weight(cfg: RunConfig, data: LoadedData, extra: dict[str, Any]) -> dict[int, float] | None:
    if cfg.train.class_weight != "auto":
        return None
    weights = balanced_class_weight(data.split_rows("train")[1], len(data.class_names))
    extra["class_weight"] = {data.class_names[c]: round(w, 4) for c, w in weights.items()}
    return weights


def _fit_phases(fitter: Fitter, phases: list[Phase], num_classes: int, cfg: RunConfig, warnings: list[str]) -> str:
    """Fit each phase in turn; "completed", or "interrupted" (Ctrl-C)."""
    status = "completed"
    for phase in phases:
        if phase.number == 2 and phase.learning_rate is not None:
            refusal = fitter.head_not_trained(num_classes)
            if refusal and not cfg.train.force:
                warnings.append(_warn(refusal))
                break
        status = fitter.fit(phase)
        if status != "completed":
            break
    return status


def _final_model(fitter: Fitter, plan: _Plan, data: LoadedData, cfg: RunConfig, status: str,
                 deadline: float | None) -> keras.Model:
    """The model to save: best or annealed weights, BatchNorm statistics re-estimated, in float32."""
    model = plan.model
    if status != "completed" or (cfg.train.schedule not in DECAYING_SCHEDULES and deadline is None):
        fitter.restore_best()  # a run annealed to a rate of ~0 keeps its final weights
    if status == "completed":
        # Moving statistics lag behind fast-moving weights: recompute them for the final model.
        plan.extra["batchnorm_reestimated_on"] = reestimate_batchnorm(model, _plain_train_batches(data, cfg))
    plan.extra["phases"] = fitter.phases
    if fitter.budget is not None:
        plan.extra["time_budget"] = fitter.budget.record()
    # The saved model computes in float32 on any machine, and has no progressive-resizing layer (a
    # training-only layer: without it the file loads in plain Keras).
    return without_progressive(as_float32(model))


def _save_outputs(run: RunDirectory, model: keras.Model, data: LoadedData, cfg: RunConfig,
                  history: dict[str, list[float]]) -> None:
    meta = ModelMeta(data.class_names, cfg.data.image_size, cfg.data.color_mode, cfg.data.resize_mode,
                     cfg.model.name, max_pixels=cfg.data.max_pixels)
    save_model(model, run.path / MODEL_FILE, meta)
    write_history(history, run.path / HISTORY_CSV)
    if history.get("loss"):
        from cnnkit.plots import plot_curves

        plot_curves(history, run.path / "curves.png")


def _plain_train_batches(data: LoadedData, cfg: RunConfig) -> ArrayBatches:
    """Shuffled training batches without augmentation (for the BatchNorm statistics)."""
    rows, labels = data.split_rows("train")
    return ArrayBatches(data.cache.images, rows, labels, max(cfg.train.batch_size, 256), shuffle=True,
                        seed=cfg.data.seed + 1)


def _warn(message: str) -> str:
    warn(message)
    return message


def _split_options_unused(cfg: RunConfig, data: LoadedData) -> list[str]:
    """--val-split / --test-split given for a split the folder already has: said, not silently ignored."""
    unused = []
    for split, option, fraction in (("validation", "val-split", cfg.data.val_split),
                                    ("test", "test-split", cfg.data.test_split)):
        if fraction and data.folder.split_source.get(split) == "folder":
            unused.append(f"--{option} {fraction:g} has no effect: '{data.folder.root}' has its own {split} folder, "
                          f"which is the {split} set. Drop the option, or move that folder away to split train/ "
                          "instead.")
    return unused


def _describe_data(data: LoadedData, run_dir: Path) -> None:
    """Print what was found and skipped."""
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
        say(f"[yellow]skipped {len(data.skipped)} files[/]: {esc(summary)}. Listed in {esc(run_dir / SKIPPED_CSV)}")


def _final_metrics(model: keras.Model, data: LoadedData, cfg: RunConfig, history: dict[str, list[float]],
                   monitor: str) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if history.get(monitor):
        best = int(np.argmin(history[monitor]))
        metrics["best_epoch"] = best + 1
        metrics["epochs_run"] = len(history[monitor])
        metrics["train_accuracy"] = history["accuracy"][best]
        metrics["train_loss"] = history["loss"][best]
    mode = final_tta(cfg.train.tta, cfg.train.augment)
    for split, prefix in (("validation", "val_"), ("test", "test_")):
        rows, labels = data.split_rows(split)
        if len(rows):
            ds = ArrayBatches(data.cache.images, rows, labels, max(cfg.train.batch_size, 256))
            probs, averaged = _predict_batches(model, ds, f"Evaluating {split}", mode)
            metrics[f"{prefix}loss"] = cross_entropy(probs, labels)
            metrics[f"{prefix}accuracy"] = float(np.mean(probs.argmax(axis=1) == labels))
            if averaged is not None:
                metrics[f"{prefix}accuracy_tta"] = float(np.mean(averaged.argmax(axis=1) == labels))
    if "val_accuracy" in metrics:
        def shown(prefix: str) -> str:
            text = f"{metrics[prefix + 'accuracy']:.2%}"
            return text + (f" ({metrics[prefix + 'accuracy_tta']:.2%} with {mode} TTA)"
                           if prefix + "accuracy_tta" in metrics else "")

        say(f"[bold green]validation accuracy {shown('val_')}[/]"
            + (f", test accuracy {shown('test_')}" if "test_accuracy" in metrics else ""))
    return metrics


def _predict_batches(model: keras.Model, batches: ArrayBatches, title: str,
                     mode: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities of every batch, and their average over the ``mode`` views (None: no TTA)."""
    plain, averaged = [], []
    with progress_task(title + (f" ({mode} views)" if mode else ""), len(batches)) as advance:
        for index in range(len(batches)):
            views = tta_views(batches[index][0], mode)
            probs = [np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(v)), dtype=np.float64) for v in views]
            plain.append(probs[0])
            averaged.append(np.mean(probs, axis=0))
            advance(1)
    return np.concatenate(plain), (np.concatenate(averaged) if mode else None)


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
        "augmentation": {"preset": cfg.train.augment, "layers": augment_config(cfg.train.augment)},
        "versions": versions(),
        "metrics": metrics,
        "epochs_run": epochs_run,
        "train_seconds": round(seconds, 1),
        "warnings": warnings,
    }
