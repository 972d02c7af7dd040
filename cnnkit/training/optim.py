"""Training stage helpers: the optimizer, its learning-rate schedule and the loss, from a TrainConfig.

Schedules are Keras ``LearningRateSchedule`` objects driven by the optimizer's step counter, so a
resumed run (optimizer state restored from ``last.keras``) continues the curve where it stopped:

* ``plateau``: a constant rate that ``ReduceLROnPlateau`` halves when val_loss stalls.
* ``cosine``: ``CosineDecay`` from the rate to 0 over the phase's steps.
* ``onecycle``: linear warm-up from rate/25 to the rate over the first 30% of the steps, then
  cosine decay to 0 (the learning-rate half of Smith's one-cycle policy, as fastai's
  ``fit_one_cycle``; momentum is not cycled).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from cnnkit.config import TrainConfig
from cnnkit.models import LOSS
from cnnkit.models.saving import all_layers

ONECYCLE_WARMUP = 0.3  # fastai's default pct_start
ONECYCLE_START_DIVISOR = 25.0  # fastai's div


def make_optimizer(cfg: TrainConfig, learning_rate: float, total_steps: int,
                   lr_multipliers: dict[str, float] | None = None, schedule: str | None = None,
                   ) -> keras.optimizers.Optimizer:
    """The optimizer ``cfg.optimizer`` with ``cfg.schedule`` over ``total_steps`` steps.

    ``lr_multipliers`` (variable path -> factor, see ``layer_lr_multipliers``) gives discriminative
    rates: those variables learn at ``factor`` times the scheduled rate. ``schedule`` overrides
    ``cfg.schedule`` ("plateau" = a constant rate that callbacks may change). Mixed float16 needs loss
    scaling; Keras's ``compile`` wraps the optimizer in a ``LossScaleOptimizer`` itself.
    """
    rate = make_schedule(schedule or cfg.schedule, learning_rate, total_steps)
    kwargs: dict = {"lr_multipliers": lr_multipliers} if lr_multipliers else {}
    classes = _LAYERWISE if lr_multipliers else {"sgd": keras.optimizers.SGD, "adamw": keras.optimizers.AdamW,
                                         "adam": keras.optimizers.Adam}
    if cfg.ema:  # the model's weights become the average when fit ends (finalize_variable_values)
        kwargs.update(use_ema=True, ema_momentum=cfg.ema)
    if cfg.optimizer == "sgd":
        optimizer = classes["sgd"](rate, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay or None, **kwargs)
    elif cfg.optimizer == "adamw":
        optimizer = classes["adamw"](rate, weight_decay=cfg.weight_decay, **kwargs)
    else:
        return classes["adam"](rate, **kwargs)
    # Decay the kernels only: BatchNorm's beta/gamma and biases are shifts and scales, not capacity.
    optimizer.exclude_from_weight_decay(var_names=["beta", "gamma", "bias"])
    return optimizer


def layer_lr_multipliers(model: keras.Model, decay: float, blocks: int = 10) -> dict[str, float]:
    """Discriminative rates: the trainable backbone layers in ``blocks`` groups, earliest lowest.

    The last group (nearest the head) gets 1, the one before ``decay``, then ``decay**2``... as
    fastai's ``slice(lr/100, lr)``; the head always learns at the full rate. ``decay`` 1 -> {}.
    """
    from cnnkit.models.transfer import get_backbone

    backbone = get_backbone(model)
    if decay >= 1.0 or backbone is None:
        return {}
    trainable = [layer for layer in backbone.layers if layer.trainable_weights]
    multipliers = {}
    for index, layer in enumerate(trainable):
        group = (len(trainable) - 1 - index) * blocks // max(len(trainable), 1)
        for variable in layer.trainable_weights:
            multipliers[variable.path] = float(decay**group)
    return multipliers


def batchnorm_shift_multipliers(model: keras.Model, factor: float) -> dict[str, float]:
    """Every trainable BatchNorm ``beta`` (nested models too) -> ``factor``; ``factor`` 1 -> {}."""
    if factor == 1.0:
        return {}
    return {layer.beta.path: float(factor)
            for layer in all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.center and layer.beta.trainable}


class _LayerwiseRates:
    """Mixin scaling the rate per variable (``update_step`` runs once per variable, on every backend).

    On PyTorch, Keras swaps in its fused ``torch._foreach`` optimizers (which bypass ``update_step``)
    only for the exact classes ``Adam``, ``AdamW``, ``SGD``...; these subclasses keep the per-variable
    path, so the multipliers apply on PyTorch too (``tests/test_every_backend.py`` checks it).
    """

    def __init__(self, *args, lr_multipliers: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = dict(lr_multipliers or {})
        self._scales: list[float] = []

    def build(self, variables):
        self._scales = [self.lr_multipliers.get(v.path, 1.0) for v in variables]
        super().build(variables)

    def update_step(self, gradient, variable, learning_rate):
        scale = self._scales[self._get_variable_index(variable)] if self._scales else 1.0
        return super().update_step(gradient, variable, learning_rate * scale if scale != 1.0 else learning_rate)

    def get_config(self):
        return {**super().get_config(), "lr_multipliers": self.lr_multipliers}


@keras.saving.register_keras_serializable(package="cnnkit")
class LayerwiseAdam(_LayerwiseRates, keras.optimizers.Adam):
    """Adam with per-variable rate multipliers (discriminative fine-tuning)."""


@keras.saving.register_keras_serializable(package="cnnkit")
class LayerwiseAdamW(_LayerwiseRates, keras.optimizers.AdamW):
    """AdamW with per-variable rate multipliers (discriminative fine-tuning)."""


@keras.saving.register_keras_serializable(package="cnnkit")
class LayerwiseSGD(_LayerwiseRates, keras.optimizers.SGD):
    """SGD with per-variable rate multipliers (discriminative fine-tuning)."""


_LAYERWISE = {"adam": LayerwiseAdam, "adamw": LayerwiseAdamW, "sgd": LayerwiseSGD}


def onecycle_rate(progress: float, learning_rate: float) -> float:
    """The onecycle rate at ``progress`` in [0, 1] of the run (the shape ``make_schedule`` builds)."""
    progress = min(max(progress, 0.0), 1.0)
    start = learning_rate / ONECYCLE_START_DIVISOR
    if progress < ONECYCLE_WARMUP:
        return start + (learning_rate - start) * progress / ONECYCLE_WARMUP
    decay = (progress - ONECYCLE_WARMUP) / (1 - ONECYCLE_WARMUP)
    return learning_rate * 0.5 * (1 + float(np.cos(np.pi * decay)))


def make_schedule(schedule: str, learning_rate: float, total_steps: int):
    """A float (plateau) or a LearningRateSchedule over ``total_steps`` (cosine, onecycle)."""
    total_steps = max(int(total_steps), 1)
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total_steps)
    if schedule == "onecycle":
        warmup = max(1, int(total_steps * ONECYCLE_WARMUP))
        return keras.optimizers.schedules.CosineDecay(
            learning_rate / ONECYCLE_START_DIVISOR, decay_steps=max(total_steps - warmup, 1),
            warmup_target=learning_rate, warmup_steps=warmup)
    return float(learning_rate)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The rate the optimizer applies at its current step (schedules evaluated)."""
    rate = optimizer.learning_rate
    return float(ops.convert_to_numpy(rate))


@keras.saving.register_keras_serializable(package="cnnkit")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing (Keras's sparse loss has none).

    The integer label becomes ``one_hot * (1 - label_smoothing) + label_smoothing / num_classes``.
    """

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        num_classes = ops.shape(y_pred)[-1]
        labels = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), num_classes, dtype=y_pred.dtype)
        labels = labels * (1.0 - self.label_smoothing) + self.label_smoothing / ops.cast(num_classes, y_pred.dtype)
        return keras.losses.categorical_crossentropy(labels, y_pred)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def make_loss(label_smoothing: float):
    """The loss: sparse categorical cross-entropy, smoothed when ``label_smoothing`` > 0."""
    return SmoothedSparseCrossentropy(label_smoothing) if label_smoothing > 0 else LOSS


def balanced_class_weight(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """scikit-learn's "balanced" weights, ``n_images / (num_classes * count)`` per class present."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes)
    total = counts.sum()
    return {c: float(total / (num_classes * n)) for c, n in enumerate(counts) if n}
