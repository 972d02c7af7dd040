"""Training stage: fitting a model in phases, shared by ``train`` and ``lr_find``.

A run is a plan of phases, each one ``fit`` call: phase 1 trains a from-scratch model, or the new
head on a frozen pre-trained backbone; phase 2 unfreezes the backbone's top layers and recompiles
at a lower rate. ``Fitter`` runs them on one model with one history (``HistoryRecorder``, with a
``phase`` column), one best-weights checkpoint across phases and resumes (``best.weights.h5``), and
``last.keras`` after every epoch for ``--resume``.

Two things make short runs right:

* ``reestimate_batchnorm``: after the last step, every trainable BatchNorm layer's moving mean and
  variance are recomputed as the plain average over training batches in training mode. Moving
  averages lag behind weights that moved fast (a high learning rate, few steps): a BatchNorm CNN
  trained 2 epochs at batch 512 otherwise scores near chance at test time.
* ``TimeBudget`` (``cnnkit.training.budget``, ``--time-budget``): the one-cycle rate follows the
  wall clock, and training stops when the budget is spent.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnnkit._backends import fit_input
from cnnkit._progress import say, warn
from cnnkit.config import RunConfig
from cnnkit.data.batches import ArrayBatches, BatchAugment
from cnnkit.data.dataset import LoadedData
from cnnkit.models import build_model, get_spec
from cnnkit.models.fast import set_whitening
from cnnkit.models.saving import all_layers
from cnnkit.models.transfer import set_backbone_frozen, unfreeze_top
from cnnkit.rundir import HISTORY_CSV
from cnnkit.training.callbacks import BestCheckpoint, HistoryRecorder, LastCheckpoint, RichEpochs
from cnnkit.training.optim import batchnorm_shift_multipliers, layer_lr_multipliers, make_loss, make_optimizer
from cnnkit.training.progressive import ProgressiveResizing, progressive_side, resize_layer, schedule_text
from cnnkit.training.precision import dtype_policy

# Schedules that decay the rate to ~0 over a planned length: stopping them early (EarlyStopping)
# would keep a model trained at a high rate, so they run to the end and keep the best checkpoint.
DECAYING_SCHEDULES = ("cosine", "onecycle")
# Training images whose statistics re-estimate the BatchNorm layers after the last step.
BATCHNORM_IMAGES = 5_120


def is_pretrained(cfg: RunConfig) -> bool:
    """True when the model is a backbone with pre-trained weights (frozen in phase 1)."""
    return get_spec(cfg.model.name).is_backbone and cfg.model.weights != "none"


@dataclass(frozen=True)
class Phase:
    """One ``fit`` call: phase 1 (head on a frozen backbone, or a whole model) or 2 (fine-tuning)."""

    number: int
    epochs: int
    learning_rate: float | None  # None: keep the compiled optimizer (a resumed phase)
    # A new schedule on the weights as they are: more epochs after a resumed run's finished phase (no
    # restore of the best checkpoint, no unfreezing: phase 2's setup was done when it first ran).
    continued: bool = False


def plan_phases(cfg: RunConfig, learning_rate: float) -> list[Phase]:
    """Phase 1 at ``learning_rate`` (unless epochs is 0), then phase 2 at the fine-tuning rate."""
    phases = [Phase(1, cfg.train.epochs, learning_rate)] if cfg.train.epochs else []
    if cfg.train.fine_tune_epochs:
        phases.append(Phase(2, cfg.train.fine_tune_epochs, cfg.train.phase2_learning_rate or learning_rate / 10))
    return phases


def make_batches(data: LoadedData, cfg: RunConfig, devices: int = 1) -> tuple[ArrayBatches, ArrayBatches | None]:
    """Shuffled training batches and (when there is a validation split) validation batches.

    With several ``devices`` every batch is a multiple of their number (see ``ArrayBatches``).
    """
    train_rows, train_labels = data.split_rows("train")
    val_rows, val_labels = data.split_rows("validation")
    images = data.cache.images
    train_ds = ArrayBatches(images, train_rows, train_labels, cfg.train.batch_size, shuffle=True, seed=cfg.data.seed,
                            augment=batch_augment(cfg.train.augment), multiple_of=devices)
    val_ds = (ArrayBatches(images, val_rows, val_labels, cfg.train.batch_size, multiple_of=devices)
              if len(val_rows) >= devices else None)
    return train_ds, val_ds


def batch_augment(preset: str) -> BatchAugment | None:
    """The loader-side augmentation of a preset (``flip-translate``), or None for layer presets."""
    from cnnkit.models.augment import BATCH_PRESETS

    if preset not in BATCH_PRESETS:
        return None
    options = BATCH_PRESETS[preset]
    return BatchAugment(flip=options["flip"], translate=options["translate"])



# Training images the whitening stem of ``fast`` is fitted to (the first of the train split, by index).
WHITEN_IMAGES = 2_000


def build_for_training(cfg: RunConfig, num_classes: int, policy: str, data: LoadedData | None = None) -> keras.Model:
    """The model of ``cfg``, built in ``policy``; a backbone frozen for phase 1.

    With ``data``, a ``fast`` model with ``stem = "whiten"`` has its whitening layer fitted to the
    training images (``set_whitening``); without it (a throughput probe), the layer keeps its random
    initial filters.
    """
    with dtype_policy(policy):
        model = build_model(cfg.model.name, num_classes, cfg.data.image_size, cfg.data.channels,
                            augment=cfg.train.augment, seed=cfg.data.seed, weights=cfg.model.weights,
                            head_width=cfg.model.head_width, dropout=cfg.model.dropout,
                            upscale_size=cfg.model.upscale_size, width=cfg.model.width,
                            stem=cfg.model.stem, init=cfg.model.init, resizable=cfg.train.progressive_start < 1.0)
    if is_pretrained(cfg):
        set_backbone_frozen(model)
    if data is not None and cfg.model.stem == "whiten":
        rows = data.split_rows("train")[0]
        set_whitening(model, data.cache.images[np.sort(rows[:WHITEN_IMAGES])])
    return model


class Fitter:
    """Runs the phases of one training run on one model, sharing history and checkpoints."""

    def __init__(self, model: keras.Model, cfg: RunConfig, run_path: Path, train_ds: ArrayBatches,
                 val_ds: ArrayBatches | None, monitor: str, class_weight: dict[int, float] | None,
                 extra_callbacks: list[keras.callbacks.Callback], history: dict[str, list[float]] | None,
                 total_epochs: int) -> None:
        self.model, self.cfg, self.train_ds, self.val_ds = model, cfg, train_ds, val_ds
        self.monitor, self.class_weight, self.extra_callbacks = monitor, class_weight, extra_callbacks
        self.recorder = HistoryRecorder(history)
        self.resumed = self.recorder.epochs > 0  # progressive resizing is for a run's first epochs only
        self.total_epochs = self.recorder.epochs + total_epochs
        self.best_path = run_path / "best.weights.h5"
        self.last = LastCheckpoint(run_path / "last.keras", self.recorder, run_path / HISTORY_CSV)
        earlier = (history or {}).get(monitor)
        # One best-weights checkpoint across phases and resumes: its threshold is the best so far.
        self.best = BestCheckpoint(self.best_path, monitor, min(earlier) if earlier else None)
        self.phases: list[dict[str, Any]] = []
        self.budget = None  # a cnnkit.training.budget.TimeBudget when --time-budget is set

    def fit(self, phase: Phase) -> str:
        """Fit one phase; "completed" or "interrupted" (Ctrl-C)."""
        train_cfg = self.cfg.train
        info: dict[str, Any] = {"phase": phase.number, "first_epoch": self.recorder.epochs + 1}
        if phase.number == 2 and phase.learning_rate is not None and not phase.continued:
            self._restore(self.best_path)  # fine-tune from the best head, not the last epoch's
            unfrozen = unfreeze_top(self.model, train_cfg.fine_tune_layers)
            info["fine_tune_layers"] = train_cfg.fine_tune_layers
            info["unfrozen_layers"] = len(unfrozen)  # BatchNorm layers among the top ones stay frozen
            say(f"[bold]phase 2[/]: fine-tuning the top {len(unfrozen)} backbone layers (BatchNorm frozen) at "
                f"learning rate {phase.learning_rate:.2g}")
        if phase.learning_rate is not None:
            multipliers = layer_lr_multipliers(self.model, train_cfg.layer_lr_decay) if phase.number == 2 else {}
            for path, factor in batchnorm_shift_multipliers(self.model, train_cfg.bn_bias_lr).items():
                multipliers[path] = multipliers.get(path, 1.0) * factor
            # Under a time budget the rate is set per step by TimeBudget: a plain variable, no schedule.
            optimizer = make_optimizer(train_cfg, phase.learning_rate, len(self.train_ds) * phase.epochs, multipliers,
                                       schedule="plateau" if self.budget is not None else None)
            self.model.compile(optimizer=optimizer, loss=make_loss(train_cfg.label_smoothing), metrics=["accuracy"])
            info["learning_rate"] = phase.learning_rate
        info["trainable_weights"] = len(self.model.trainable_weights)
        self.recorder.phase = phase.number
        start = self.recorder.epochs
        callbacks: list[keras.callbacks.Callback] = [self.recorder]
        if train_cfg.schedule not in DECAYING_SCHEDULES:
            callbacks.append(keras.callbacks.EarlyStopping(monitor=self.monitor, patience=train_cfg.patience,
                                                           restore_best_weights=True))
        callbacks += [self.best, self.last]
        if self.budget is not None:
            callbacks.insert(0, self.budget)
        resizing = None
        if train_cfg.progressive_start < 1.0 and not self.resumed:
            budget = self.budget
            progress = (lambda epoch: budget.progress()) if budget is not None else \
                (lambda epoch: epoch / max(self.total_epochs, 1))
            full = tuple(self.model.input_shape[1:3])
            resizing = ProgressiveResizing(train_cfg.progressive_start, full, progress)
            if phase.learning_rate is not None and resize_layer(self.model) is not None:  # said once, not on resume
                first = progressive_side(0.0, train_cfg.progressive_start, min(full))
                say(f"progressive resizing: {schedule_text(train_cfg.progressive_start, min(full))}; a step at {first} px "
                    f"costs about {(first / min(full)) ** 2:.0%} of one at {min(full)} px, so more epochs fit "
                    f"(--progressive {train_cfg.progressive_start:g}; --progressive 1 turns it off)")
            callbacks.insert(1 if budget is not None else 0, resizing)
        if train_cfg.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor=self.monitor, factor=0.5, patience=max(1, train_cfg.patience // 2), min_lr=1e-7))
        label = f"phase {phase.number}: " if self.cfg.train.fine_tune_epochs else ""
        total = None if self.budget is not None else self.total_epochs
        callbacks += [RichEpochs(total, len(self.train_ds), label, budget=self.budget), *self.extra_callbacks]
        status = "completed"
        self.train_ds.start_at(start)  # a resumed run sees the order and flips an uninterrupted one would
        try:
            with fit_input():
                self.model.fit(self.train_ds, validation_data=self.val_ds, initial_epoch=start,
                               epochs=start + phase.epochs, class_weight=self.class_weight, callbacks=callbacks,
                               verbose=0)
        except KeyboardInterrupt:
            status = "interrupted"
            warn("Interrupted: keeping the best checkpoint so far.")
        info["epochs_run"] = self.recorder.epochs - start
        if resizing is not None:
            info["progressive_sides"] = resizing.sides  # the training side of each epoch
        self.phases.append(info)
        return status

    def head_not_trained(self, num_classes: int) -> str | None:
        """Why phase 2 must not start (the head is still at chance), or None."""
        key = "val_accuracy" if "val_accuracy" in self.recorder.history else "accuracy"
        accuracy = max(self.recorder.history.get(key, [0.0]))
        chance = 1.0 / num_classes
        if accuracy < chance + 0.5 * (1 - chance) * 0.2:
            return (f"Fine-tuning skipped: after phase 1 the head's best {key} is {accuracy:.1%} (chance {chance:.1%}), "
                    "so unfreezing now would push random gradients into the pre-trained backbone. Train the head "
                    "longer (--epochs), check the data, or pass --force to fine-tune anyway.")
        return None

    def restore_best(self) -> None:
        self._restore(self.best_path)

    def _restore(self, path: Path) -> None:
        if path.exists():
            with warnings.catch_warnings():  # the saved optimizer state is not wanted here, only the weights
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                self.model.load_weights(path)


def trainable_batchnorm(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The BatchNorm layers ``reestimate_batchnorm`` recomputes (a frozen backbone's are not among them)."""
    return [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def reestimate_batchnorm(model: keras.Model, batches: ArrayBatches, max_images: int = BATCHNORM_IMAGES) -> int:
    """Recompute the moving statistics of the trainable BatchNorm layers on training batches.

    Each layer's moving mean and variance are reset, then averaged with equal weight over the
    forward passes in training mode (momentum ``k / (k + 1)`` at pass ``k``: the cumulative mean),
    on up to ``max_images`` images. Frozen BatchNorm layers (a pre-trained backbone's) are left as
    they are. Returns the number of images used (0 when the model has no trainable BatchNorm).
    """
    norms = trainable_batchnorm(model)
    if not norms or not len(batches):
        return 0
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.moving_mean.assign(np.zeros(layer.moving_mean.shape, "float32"))
        layer.moving_variance.assign(np.ones(layer.moving_variance.shape, "float32"))
    seen = 0
    try:
        for index in range(len(batches)):
            images = batches[index][0]
            for layer in norms:
                layer.momentum = index / (index + 1)
            model(images, training=True)
            seen += len(images)
            if seen >= max_images:
                break
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return seen
