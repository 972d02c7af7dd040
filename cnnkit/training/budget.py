"""Training stage: ``--time-budget``, a wall-clock budget for a whole run.

``TimeBudget`` is a callback: the one-cycle rate follows the fraction of the wall-clock budget used
instead of the step count, and training stops when the budget is spent, so the schedule fits the
budget whatever the machine's speed (or its swings) turns out to be. The reserve for the work after
training (BatchNorm re-estimation, final evaluation, saving) is re-measured from the first
validation pass. ``fast_width`` picks ``fast``'s width from what the budget affords per image.
"""

from __future__ import annotations

import dataclasses
import time

import keras

from cnnkit._progress import say
from cnnkit.config import RunConfig
from cnnkit.data.dataset import LoadedData
from cnnkit.errors import ConfigError
from cnnkit.models.augment import trains_with_flips
from cnnkit.training.fitting import BATCHNORM_IMAGES
from cnnkit.training.optim import onecycle_rate

# Under a time budget, epochs are not planned: training stops when the budget is spent.
BUDGET_MAX_EPOCHS = 100_000


class TimeBudget(keras.callbacks.Callback):
    """Fits the one-cycle schedule to a wall-clock budget and stops training when it is spent.

    Args:
        deadline: ``time.monotonic()`` value by which ``cnnkit train`` must be done.
        learning_rate: the peak rate of the one-cycle schedule.
        reserve: seconds kept for the work after training (BatchNorm re-estimation, final
            evaluation, saving); refined from the measured speed of the first validation pass.
        after_training_images: images passed forward after training (for that estimate).
        validation_images: images of one validation pass (0: none).
    """

    def __init__(self, deadline: float, learning_rate: float, reserve: float, after_training_images: int,
                 validation_images: int = 0) -> None:
        super().__init__()
        self.deadline, self.learning_rate, self.reserve = deadline, learning_rate, reserve
        self.after_training_images, self.validation_images = after_training_images, validation_images
        self.reserve_measured = False
        # A first validation pass includes compiling: never let its estimate eat the budget.
        self.max_reserve = max(reserve, 0.25 * (deadline - time.monotonic()))
        self.started: float | None = None
        self.steps = 0
        self.last_rate = 0.0  # the rate of the last step taken
        self._test_started = 0.0

    @property
    def end(self) -> float:
        return self.deadline - self.reserve

    def progress(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.started is None:
            return 0.0
        return min(1.0, (now - self.started) / max(self.end - self.started, 1e-9))

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if keras.backend.backend() == "jax":
            # JAX's trainer fetches variables only at an epoch's first step unless they were synced:
            # sync so that the new rate (an optimizer variable) reaches this step.
            self.model.jax_state_sync()
        self.last_rate = onecycle_rate(self.progress(), self.learning_rate)
        self.model.optimizer.learning_rate = self.last_rate

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.steps += 1
        if time.monotonic() >= self.end:
            self.model.stop_training = True

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._test_started = time.monotonic()

    def on_test_end(self, logs: dict | None = None) -> None:
        if self.reserve_measured:
            return
        seconds = time.monotonic() - self._test_started
        if self.validation_images and seconds > 0:
            self.reserve = min(self.max_reserve, 3.0 + self.after_training_images * seconds / self.validation_images)
            self.reserve_measured = True


def make_time_budget(deadline: float, learning_rate: float, data: LoadedData, cfg: RunConfig) -> TimeBudget:
    """The budget callback; what runs after training is estimated from the first validation pass.

    Raises:
        ConfigError: decoding already spent most of the budget.
    """
    views = 2 if trains_with_flips(cfg.train.augment) else 1
    held_out = sum(len(data.split_rows(s)[0]) for s in ("validation", "test"))
    after = held_out * views + min(BATCHNORM_IMAGES, len(data.split_rows("train")[0]))
    budget = TimeBudget(deadline, learning_rate, reserve=0.05 * cfg.train.time_budget + 5, after_training_images=after,
                        validation_images=len(data.split_rows("validation")[0]))
    if budget.remaining() < 0.2 * cfg.train.time_budget:
        raise ConfigError(
            f"--time-budget {clock(cfg.train.time_budget)} is spent before training starts (decoding took "
            f"{clock(cfg.train.time_budget - (deadline - time.monotonic()))}): give a larger budget. The decoded images "
            f"are cached, so a second run starts sooner. Received: time_budget={cfg.train.time_budget:g}")
    return budget


def fast_width(cfg: RunConfig, data: LoadedData, deadline: float | None) -> RunConfig:
    """``fast``'s width: medium, or what the time left after decoding affords per training image."""
    from cnnkit.models.fast import DEFAULT_WIDTH, width_for_budget

    width = DEFAULT_WIDTH
    if deadline is not None:
        width = width_for_budget(deadline - time.monotonic(), len(data.split_rows("train")[0]), cfg.data.image_size)
        say(f"model width for this budget: [bold]{width}[/] (--width to choose)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=width))


def clock(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``42`` -> ``42s``."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
