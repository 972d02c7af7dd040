"""Training stage: the learning-rate range test (Smith 2015; fastai's ``lr_find``), which Keras lacks.

The rate grows exponentially from ``start_lr`` to ``end_lr`` over ``steps`` training steps of a
throw-away copy of the model; the loss is recorded per step, smoothed (exponential moving
average, beta 0.98 as fastai) and the test stops early once it diverges (over 4x the best loss).
The suggestion is the rate of the steepest fall of the smoothed loss before its minimum, capped
at a tenth of the rate at the minimum (the "min/10" rule), a rate that trains fast and stays
stable. ``cnnkit train --lr auto`` runs this first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cnnkit._backends import fit_input
from cnnkit.config import TrainConfig
from cnnkit.errors import ConfigError
from cnnkit.training.optim import make_loss, make_optimizer

SMOOTHING = 0.98
MIN_STEPS = 5  # fewer losses cannot show a descent to suggest a rate from
DIVERGE_FACTOR = 4.0


@dataclass
class LRFindResult:
    """What the range test found.

    Attributes:
        learning_rates: the rate of every step taken.
        losses: the smoothed training loss after each step.
        suggested: the suggested learning rate.
        steepest: the rate where the smoothed loss fell fastest.
        minimum: the rate of the lowest smoothed loss.
    """

    learning_rates: list[float]
    losses: list[float]
    suggested: float
    steepest: float
    minimum: float

    def to_dict(self) -> dict[str, Any]:
        return {"suggested": self.suggested, "steepest": self.steepest, "minimum": self.minimum,
                "learning_rates": self.learning_rates, "losses": self.losses}


class _RangeTest(keras.callbacks.Callback):
    def __init__(self, start_lr: float, end_lr: float, steps: int) -> None:
        super().__init__()
        self.start_lr, self.steps = start_lr, steps
        self.factor = (end_lr / start_lr) ** (1.0 / max(steps - 1, 1))
        self.rates: list[float] = []
        self.losses: list[float] = []
        self._avg, self._best, self._prev_mean = 0.0, math.inf, 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        rate = self.start_lr * self.factor ** len(self.rates)
        self.model.optimizer.learning_rate = rate
        self.rates.append(rate)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        mean = float((logs or {}).get("loss", math.nan))
        loss = (batch + 1) * mean - batch * self._prev_mean  # logs hold the epoch's running mean
        self._prev_mean = mean
        self._avg = SMOOTHING * self._avg + (1 - SMOOTHING) * loss
        smoothed = self._avg / (1 - SMOOTHING ** len(self.rates))
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if len(self.rates) >= self.steps or not math.isfinite(smoothed) or smoothed > DIVERGE_FACTOR * self._best:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._prev_mean = 0.0


def find_learning_rate(model: keras.Model, train_ds: keras.utils.PyDataset, train_cfg: TrainConfig,
                       steps: int = 200, start_lr: float = 1e-7, end_lr: float = 10.0) -> LRFindResult:
    """Run the range test on ``model`` (its weights are changed: pass a throw-away copy).

    Args:
        model: an uncompiled model, built as for training (backbone frozen for phase 1).
        train_ds: the training batches.
        train_cfg: optimizer, label smoothing (the schedule is replaced by the range test).
        steps: the most steps to take (fewer when the loss diverges first).
        start_lr, end_lr: the range of rates, covered exponentially.
    """
    _check_steps(steps)
    constant = dataclasses.replace(train_cfg, schedule="plateau", learning_rate=start_lr)
    model.compile(optimizer=make_optimizer(constant, start_lr, steps), loss=make_loss(train_cfg.label_smoothing),
                  metrics=["accuracy"])
    test = _RangeTest(start_lr, end_lr, steps)
    epochs = math.ceil(steps / max(len(train_ds), 1))
    with fit_input():
        model.fit(train_ds, epochs=epochs, callbacks=[test], verbose=0)  # stops mid-epoch
    return _suggest(test.rates, test.losses)


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < MIN_STEPS:
        raise ConfigError(f"The learning-rate range test takes at least {MIN_STEPS} steps (--steps; default 200). "
                          f"Received: steps={steps!r}")


def _suggest(rates: list[float], losses: list[float]) -> LRFindResult:
    n = len(losses)
    if n < MIN_STEPS:
        from cnnkit.errors import DataError

        raise DataError(f"The learning-rate range test needs at least {MIN_STEPS} steps; it ran {n}. Use more images "
                        "or a smaller --batch-size.")
    losses_arr = np.array(losses)
    finite = np.isfinite(losses_arr)
    low = int(np.nanargmin(np.where(finite, losses_arr, np.inf)))
    minimum = rates[low]
    skip = max(1, n // 10)  # the first steps' averages are still warming up
    window = losses_arr[skip: low + 1]
    if len(window) >= 3:
        slopes = np.gradient(window, np.log10(rates[skip: low + 1]))
        steepest = rates[skip + int(np.argmin(slopes))]
    else:
        steepest = minimum / 10
    suggested = float(min(steepest, minimum / 10))
    return LRFindResult([float(r) for r in rates], [float(x) for x in losses], suggested, float(steepest), float(minimum))


def lr_find(data_dir: str | Path, out: str | Path | None = None, config: Any = None, *, steps: int = 200,
            cache_root: Path | None = None, **options: Any) -> LRFindResult:
    """The range test for a model (``model=`` and the other ``train`` options) on a folder.

    Writes ``lr_find.png`` (loss against rate) and ``lr_find.json`` to ``out`` when given.

    Returns:
        An LRFindResult; ``suggested`` is the rate to train with.

    Example:
        >>> rate = cnnkit.lr_find("dataset", out="runs/lr", model="simple", steps=20).suggested
    """
    _check_steps(steps)
    from cnnkit.config import resolve_config
    from cnnkit.data.dataset import load_image_folder
    from cnnkit.models import get_spec
    from cnnkit.plots import plot_lr_find
    from cnnkit.rundir import write_json
    from cnnkit.training.fitting import build_for_training, make_batches
    from cnnkit.training.precision import precision_policy

    from cnnkit._backends import require_gradients

    require_gradients("lr-find")
    cfg = resolve_config(config, **options)
    if cfg.data.image_size is None:
        size = get_spec(cfg.model.name).default_image_size
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    data = load_image_folder(Path(data_dir), cfg.data, cache_root=cache_root)
    keras.utils.set_random_seed(cfg.data.seed)
    train_ds, _ = make_batches(data, cfg)
    model = build_for_training(cfg, len(data.class_names), precision_policy(cfg.train.mixed_precision), data)
    result = find_learning_rate(model, train_ds, cfg.train, steps=steps)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plot_lr_find(result.learning_rates, result.losses, result.suggested, result.minimum, out / "lr_find.png")
        write_json(out / "lr_find.json", {"model": cfg.model.name, "config": cfg.to_dict(), **result.to_dict()})
    return result

