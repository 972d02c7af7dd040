"""Training stage: fitting a model in phases, shared by ``train`` and ``lr_find``.

A run is a plan of phases, each one ``fit`` call: phase 1 trains a from-scratch model, or the new
head on a frozen pre-trained backbone; phase 2 unfreezes the backbone's top layers and recompiles
at a lower rate. ``Fitter`` runs them on one model with one history (``HistoryRecorder``, with a
``phase`` column), one best-weights checkpoint across phases and resumes (``best.weights.h5``), and
``last.keras`` after every epoch for ``--resume``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from cnnkit._progress import say, warn
from cnnkit.callbacks import HistoryRecorder, LastCheckpoint, RichEpochs
from cnnkit.config import RunConfig
from cnnkit.data.batches import ArrayBatches
from cnnkit.data.dataset import LoadedData
from cnnkit.models import build_model, get_spec
from cnnkit.models.transfer import set_backbone_frozen, unfreeze_top
from cnnkit.optim import layer_lr_multipliers, make_loss, make_optimizer


def is_pretrained(cfg: RunConfig) -> bool:
    """True when the model is a backbone with pre-trained weights (frozen in phase 1)."""
    return get_spec(cfg.model.name).is_backbone and cfg.model.weights != "none"


@dataclass(frozen=True)
class Phase:
    """One ``fit`` call: phase 1 (head on a frozen backbone, or a whole model) or 2 (fine-tuning)."""

    number: int
    epochs: int
    learning_rate: float | None  # None: keep the compiled optimizer (a resumed phase)


def plan_phases(cfg: RunConfig, learning_rate: float) -> list[Phase]:
    """Phase 1 at ``learning_rate`` (unless epochs is 0), then phase 2 at the fine-tuning rate."""
    phases = [Phase(1, cfg.train.epochs, learning_rate)] if cfg.train.epochs else []
    if cfg.train.fine_tune_epochs:
        phases.append(Phase(2, cfg.train.fine_tune_epochs, cfg.train.phase2_learning_rate or learning_rate / 10))
    return phases


def make_batches(data: LoadedData, cfg: RunConfig) -> tuple[ArrayBatches, ArrayBatches | None]:
    """Shuffled training batches and (when there is a validation split) validation batches."""
    train_rows, train_labels = data.split_rows("train")
    val_rows, val_labels = data.split_rows("validation")
    images = data.cache.images
    train_ds = ArrayBatches(images, train_rows, train_labels, cfg.train.batch_size, shuffle=True, seed=cfg.data.seed)
    val_ds = ArrayBatches(images, val_rows, val_labels, cfg.train.batch_size) if len(val_rows) else None
    return train_ds, val_ds


def precision_policy(mixed_precision: bool) -> str:
    """The dtype policy: float32, or mixed_float16 on a GPU and mixed_bfloat16 on a CPU.

    float16 is the fast path on NVIDIA tensor cores; CPUs have no fast float16 but recent ones
    (AVX512-BF16, AMX) run bfloat16 through oneDNN, and bfloat16 needs no loss scaling.
    """
    if not mixed_precision:
        return "float32"
    gpu = any(d.lower().startswith(("gpu", "cuda")) for d in keras.distribution.list_devices())
    return "mixed_float16" if gpu else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(policy: str):
    """Build layers under ``policy``, then restore the global one (it would leak into later models)."""
    saved = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(saved)


def build_for_training(cfg: RunConfig, num_classes: int, policy: str) -> keras.Model:
    with dtype_policy(policy):
        model = build_model(cfg.model.name, num_classes, cfg.data.image_size, cfg.data.channels,
                            augment=cfg.train.augment, seed=cfg.data.seed, weights=cfg.model.weights,
                            head_width=cfg.model.head_width, dropout=cfg.model.dropout,
                            upscale_size=cfg.model.upscale_size)
    if is_pretrained(cfg):
        set_backbone_frozen(model)
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
        self.total_epochs = self.recorder.epochs + total_epochs
        self.best_path = run_path / "best.weights.h5"
        self.last_path = run_path / "last.keras"
        earlier = (history or {}).get(monitor)
        # One best-weights checkpoint across phases and resumes: its threshold is the best so far.
        self.best = keras.callbacks.ModelCheckpoint(
            str(self.best_path), monitor=monitor, save_best_only=True, save_weights_only=True,
            initial_value_threshold=min(earlier) if earlier else None)
        self.phases: list[dict[str, Any]] = []

    def fit(self, phase: Phase) -> str:
        """Fit one phase; "completed" or "interrupted" (Ctrl-C)."""
        train_cfg = self.cfg.train
        info: dict[str, Any] = {"phase": phase.number, "first_epoch": self.recorder.epochs + 1}
        if phase.number == 2 and phase.learning_rate is not None:
            self._restore(self.best_path)  # fine-tune from the best head, not the last epoch's
            unfrozen = unfreeze_top(self.model, train_cfg.fine_tune_layers)
            info["fine_tune_layers"] = train_cfg.fine_tune_layers
            info["unfrozen_layers"] = len(unfrozen)  # BatchNorm layers among the top ones stay frozen
            say(f"[bold]phase 2[/]: fine-tuning the top {len(unfrozen)} backbone layers (BatchNorm frozen) at "
                f"learning rate {phase.learning_rate:.2g}")
        if phase.learning_rate is not None:
            multipliers = layer_lr_multipliers(self.model, train_cfg.layer_lr_decay) if phase.number == 2 else {}
            optimizer = make_optimizer(train_cfg, phase.learning_rate, len(self.train_ds) * phase.epochs, multipliers)
            self.model.compile(optimizer=optimizer, loss=make_loss(train_cfg.label_smoothing), metrics=["accuracy"])
            info["learning_rate"] = phase.learning_rate
        info["trainable_weights"] = len(self.model.trainable_weights)
        self.recorder.phase = phase.number
        start = self.recorder.epochs
        callbacks = [
            self.recorder,
            keras.callbacks.EarlyStopping(monitor=self.monitor, patience=train_cfg.patience, restore_best_weights=True),
            self.best,
            LastCheckpoint(self.last_path),
        ]
        if train_cfg.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(
                monitor=self.monitor, factor=0.5, patience=max(1, train_cfg.patience // 2), min_lr=1e-7))
        label = f"phase {phase.number}: " if self.cfg.train.fine_tune_epochs else ""
        callbacks += [RichEpochs(self.total_epochs, len(self.train_ds), label), *self.extra_callbacks]
        status = "completed"
        try:
            self.model.fit(self.train_ds, validation_data=self.val_ds, initial_epoch=start,
                           epochs=start + phase.epochs, class_weight=self.class_weight, callbacks=callbacks, verbose=0)
        except KeyboardInterrupt:
            status = "interrupted"
            warn("Interrupted: keeping the best checkpoint so far.")
        info["epochs_run"] = self.recorder.epochs - start
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
