"""Training stage: ``--time-budget``, a wall-clock budget for a whole run, kept on any machine.

A budget is a promise: the run (decoding, training, final evaluation, saving) ends within a few
seconds of the time asked, on a fast CPU or one five times slower. Nothing here reads a table
measured on another machine:

* ``measure_throughput`` times a few real training steps and one inference pass of a model on
  this machine, in the precision it will train in (images per second).
* ``plan_budget`` does it for each candidate width of ``fast`` (narrowest first, skipping widths
  that could not pay off even at the narrower one's speed), picks the widest width whose
  affordable epochs reach ``cnnkit.models.fast.MIN_EPOCHS``, and says why. It prices the work after
  training (BatchNorm re-estimation, the final evaluation with its flip views, one last validation
  pass) from the measured inference speed, and keeps that much in reserve; ``evaluation_speed``
  measures the float32 model the final evaluation runs on, when training is in mixed precision.
* ``choose_progressive`` turns progressive resizing on (``progressive = "auto"``, fast's default
  under a budget) when the budget affords enough epochs at full size for it to pay.
* ``TimeBudget``, a callback, fits the one-cycle rate to the fraction of the training time used,
  and stops at the last step that still fits (an epoch's last step counts its validation pass).
  It re-measures the inference speed on every validation pass after the first (which compiles) and
  the time an epoch spends on checkpoints, so a slow or noisy machine moves the reserve, not the
  deadline.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import keras
import numpy as np

from cnnkit._progress import esc, say
from cnnkit.config import BUDGET_PROGRESSIVE, PROGRESSIVE_MIN_EPOCHS, RunConfig
from cnnkit.data.batches import TTA_VIEW_COUNT, ArrayBatches
from cnnkit.data.dataset import LoadedData
from cnnkit.errors import ConfigError
from cnnkit.models.augment import final_tta
from cnnkit.models.fast import MIN_EPOCHS
from cnnkit.models.saving import as_float32
from cnnkit.training.fitting import BATCHNORM_IMAGES, build_for_training, make_batches, trainable_batchnorm
from cnnkit.training.optim import make_loss, make_optimizer, onecycle_rate

# Under a time budget, epochs are not planned: training stops when the budget is spent.
BUDGET_MAX_EPOCHS = 100_000
# Seconds for saving the model, history and curves after the final evaluation (measured 0.2-0.4 s
# for fast on CIFAR-10 in run.json's after_training_at_s; a backbone's weights take longer).
SAVE_SECONDS = 1.5
# Timed training steps per throughput probe (after one step that compiles).
PROBE_STEPS = 2
# Under a budget with no --model, transfer learning (when installed) is chosen over fast for training
# sets with at most this many images per class (bench/transfer.py; see choose_approach).
TRANSFER_MAX_PER_CLASS = 1_000
# The size small images are upscaled to inside the backbone for transfer under a budget (96 px:
# bench/transfer.py measured 64.5% with 100 CIFAR images per class, at 74-150 images/s on 2 cores).
TRANSFER_UPSCALE = 96
# What measuring the transfer model costs (building it with its ImageNet weights, compiling, a few
# steps): weighing the two approaches is done when it fits in twice the measuring share of the budget.
TRANSFER_PROBE_SECONDS = 20.0
# Measuring widths may take this share of the budget; a wider width's probe costs up to this
# factor of the narrower one's.
PROBE_SHARE = 0.08
PROBE_GROWTH = 1.5
# A forward pass in training mode (BatchNorm re-estimation) against one in inference mode.
TRAINING_FORWARD_COST = 1.5
# Margin on the priced work after training. The price itself is close: 12.6 s priced against about
# 13 s spent (the last validation pass, BatchNorm re-estimation, evaluation with flip views) in a
# 2-minute CIFAR-10 run on a bf16 CPU. 1.5 was set while tf.data stalls of 3-35 s (see
# cnnkit._backends.fit_input) were taken for a slow machine; it ended 2-minute budgets 7-11% early.
RESERVE_MARGIN = 1.2


@dataclass(frozen=True)
class Throughput:
    """A model's speed on this machine, measured on real batches."""

    train: float  # training images per second
    predict: float  # inference images per second
    seconds: float  # what the measurement cost (building and compiling included)

    def to_dict(self) -> dict[str, float]:
        return {"train_images_per_s": round(self.train, 1), "predict_images_per_s": round(self.predict, 1),
                "probe_seconds": round(self.seconds, 2)}


def measure_throughput(model: keras.Model, batches: ArrayBatches, cfg: RunConfig, started: float | None = None,
                       steps: int = PROBE_STEPS) -> Throughput:
    """Time ``steps`` training steps and as many inference passes of ``model`` on real batches.

    Fetching each batch (reading the cache, augmenting) is timed with it, as in training. The model
    is compiled here (with the run's optimizer and loss) and trained by these steps: use a throw-away
    copy. A first step and a first inference pass compile and are not timed.
    """
    started = time.monotonic() if started is None else started
    model.compile(optimizer=make_optimizer(cfg.train, 1e-3, 1, schedule="plateau"),
                  loss=make_loss(cfg.train.label_smoothing))

    train = _images_per_second(model.train_on_batch, batches, steps)
    predict = _images_per_second(_inference(model), batches, steps)
    return Throughput(train, predict, time.monotonic() - started)


def _inference(model: keras.Model) -> Callable[[Any, Any], Any]:
    return lambda images, labels: keras.ops.convert_to_numpy(model.predict_on_batch(images))


def _images_per_second(step: Callable[[Any, Any], Any], batches: ArrayBatches, steps: int) -> float:
    """Images per second of ``step(images, labels)`` over ``steps`` real batches, after one that compiles.

    Python's garbage collector stays off while the steps are timed: a full collection walks every
    object the process holds (the backend's, the file list's), which took 0.17-0.27 s after loading
    the 60,000 CIFAR-10 JPEGs on a 2-core Xeon, up to a fifth of ``small``'s two timed steps there.
    Training meets one every 20 s or so, so it belongs in an epoch's time, not in a probe's. (No
    collection is forced first: off is enough to keep one out, and a forced one would cost the budget
    as much, twice per probe.)
    """
    step(*batches[0])  # compiles
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        images = 0
        tick = time.monotonic()
        for index in range(1, steps + 1):
            batch = batches[index % len(batches)]
            step(*batch)
            images += len(batch[0])
        return images / max(time.monotonic() - tick, 1e-9)
    finally:
        if was_enabled:
            gc.enable()


def _epochs(epochs: float) -> str:
    """Affordable epochs as the run says them: rounded down, so 7.96 reads 7.9 and never "8.0" beside a
    rule that needs 8 and was not met."""
    return f"{math.floor(epochs * 10) / 10:.1f}"


@dataclass
class BudgetPlan:
    """What a time budget measured and decided; recorded in run.json as ``time_budget``."""

    seconds: float
    train_images: int
    validation_images: int
    after_training_images: float  # inference-equivalent images after training
    batchnorm_images: float = 0.0  # their BatchNorm re-estimation's share (0: no trainable BatchNorm)
    probes: dict[str, Throughput] = field(default_factory=dict)
    width: str | None = None
    reason: str = ""
    why_not_wider: str = ""  # why choose_width stopped where it did ("" when it took the widest)
    approach: dict[str, str] | None = None  # fast against transfer learning: what was chosen, by which rule
    progressive: dict[str, Any] | None = None  # progressive resizing ("auto"): the start chosen, by which rule
    # The final model's inference speed over the training precision's: the work after training runs on
    # the float32 model (``as_float32``), slower than mixed bfloat16 on a CPU with bfloat16 (1.0 elsewhere).
    evaluation_speed: float = 1.0

    def without_batchnorm(self) -> None:
        """The model has no trainable BatchNorm (a frozen backbone's head): no re-estimation to price."""
        self.after_training_images -= self.batchnorm_images
        self.batchnorm_images = 0.0

    def reserve(self, predict_rate: float) -> float:
        """Seconds kept for the work after training, at ``predict_rate`` images per second (the training
        precision's; the last validation pass runs in it, the work after training at ``evaluation_speed``:
        this prices the BatchNorm re-estimation, done in the training precision, on the safe side)."""
        images = self.after_training_images / max(self.evaluation_speed, 1e-9) + self.validation_images
        return images / max(predict_rate, 1e-9) * RESERVE_MARGIN + SAVE_SECONDS

    def epochs_affordable(self, rate: Throughput, seconds_left: float) -> float:
        """Epochs (with their validation passes) that ``seconds_left`` buys at ``rate``."""
        training = seconds_left - self.reserve(rate.predict)
        epoch = self.train_images / max(rate.train, 1e-9) + self.validation_images / max(rate.predict, 1e-9)
        return max(training, 0.0) / max(epoch, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "width": self.width, "reason": self.reason,
                "probes": {name: rate.to_dict() for name, rate in self.probes.items()},
                "evaluation_speed": round(self.evaluation_speed, 3),
                **({"approach": self.approach} if self.approach else {}),
                **({"progressive": self.progressive} if self.progressive else {})}


def _new_plan(cfg: RunConfig, data: LoadedData) -> BudgetPlan:
    views = TTA_VIEW_COUNT[final_tta(cfg.train.tta, cfg.train.augment)]
    sizes = {split: len(data.split_rows(split)[0]) for split in ("train", "validation", "test")}
    batchnorm = TRAINING_FORWARD_COST * min(BATCHNORM_IMAGES, sizes["train"])
    after = (sizes["validation"] + sizes["test"]) * views + batchnorm
    return BudgetPlan(cfg.train.time_budget, sizes["train"], sizes["validation"], after, batchnorm)


def _probe(cfg: RunConfig, data: LoadedData, batches: ArrayBatches, policy: str, plan: BudgetPlan) -> Throughput:
    """The measured speed of ``cfg``'s model here; ``plan`` learns whether it has BatchNorm to re-estimate."""
    started = time.monotonic()
    # Each probe is a new model, so TensorFlow traces its steps anew and warns of "excessive retracing"
    # after a few: expected here, and nothing for the user to fix.
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(max(level, logging.ERROR))
    try:
        model = build_for_training(cfg, len(data.class_names), policy)
        if not trainable_batchnorm(model):
            plan.without_batchnorm()
        rate = measure_throughput(model, batches, cfg, started)
        del model
    finally:
        tf_logger.setLevel(level)
    gc.collect()
    return rate


def plan_budget(cfg: RunConfig, data: LoadedData, train_ds: ArrayBatches, policy: str, deadline: float,
                transfer: RunConfig | None = None) -> tuple[RunConfig, BudgetPlan]:
    """Measure this machine and plan the run: for ``fast`` with width "auto", the width; else the model.

    ``transfer``: when the model was not named and transfer learning is installed, its configuration,
    weighed against ``fast`` by ``choose_approach``. Returns the configuration to train (the width,
    or the other approach, filled in) and the plan. Probes are throw-away models; the caller seeds
    again before building the real one (and makes its batches again if the approach changed).
    """
    plan = _new_plan(cfg, data)
    auto = cfg.model.name == "fast" and cfg.model.width == "auto"
    if not auto:
        rate = plan.probes[cfg.model.name] = _probe(cfg, data, train_ds, policy, plan)
        epochs = plan.epochs_affordable(rate, deadline - time.monotonic())
        plan.reason = f"{_epochs(epochs)} epochs affordable at {rate.train:,.0f} training images/s measured here"
        return choose_progressive(cfg, plan, epochs), plan

    def probe(width: str) -> Throughput:
        return _probe(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=width)), data, train_ds,
                      policy, plan)

    width = choose_width(plan, probe, deadline)
    rate = plan.probes[width]
    epochs = plan.epochs_affordable(rate, deadline - time.monotonic())
    why = f"{_epochs(epochs)} epochs affordable at {rate.train:,.0f} training images/s measured here" + (
        f"; {plan.why_not_wider}" if plan.why_not_wider else "")
    plan.width, plan.reason = width, f"width {width}: {why}"
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=width))
    spent = sum(rate.seconds for rate in plan.probes.values())
    if transfer is not None and spent + TRANSFER_PROBE_SECONDS <= 2 * PROBE_SHARE * plan.seconds:
        chosen = choose_approach(cfg, plan, transfer, data, policy, deadline)
        if chosen is not None:
            return chosen
    elif transfer is not None:  # the user left the model open: say why transfer was not weighed
        shortest = (spent + TRANSFER_PROBE_SECONDS) / (2 * PROBE_SHARE)
        _keep_fast(plan, f"transfer from {transfer.model.name} not weighed: measuring it too (about "
                         f"{TRANSFER_PROBE_SECONDS:.0f} s) needs a budget of {clock(shortest)} or more")
    say(f"model width for this budget: [bold]{width}[/] ({why}; --width to choose)")
    return choose_progressive(cfg, plan, epochs), plan


def choose_progressive(cfg: RunConfig, plan: BudgetPlan, epochs: float) -> RunConfig:
    """``progressive = "auto"`` decided: ``BUDGET_PROGRESSIVE`` when the budget affords at least
    ``PROGRESSIVE_MIN_EPOCHS`` epochs at full size, else off (1.0); recorded in ``plan.progressive``.

    The rule (bench/recipe_ablation.py, CIFAR-10, 2 cores): in 10 minutes (~10 epochs at full size)
    progressive resizing ran 12 epochs instead of 9 and gained 0.3-0.6 points; in 2 minutes (3 epochs)
    it lost 3, spending half of too few epochs below the size the model is tested at.
    """
    if cfg.train.progressive != "auto":
        return cfg
    if cfg.model.name != "fast":  # only fast takes any image size: "auto" is off for the others
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progressive=1.0))
    on = epochs >= PROGRESSIVE_MIN_EPOCHS
    start = BUDGET_PROGRESSIVE if on else 1.0
    rule = (f"on from {PROGRESSIVE_MIN_EPOCHS:g} epochs affordable at full size; here {_epochs(epochs)}")
    plan.progressive = {"start": start, "rule": rule}
    say(f"progressive resizing: {'on' if on else 'off'} ({rule}; --progressive "
        f"{'1 turns it off' if on else f'{BUDGET_PROGRESSIVE:g} forces it'})")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progressive=start))


def choose_approach(fast: RunConfig, plan: BudgetPlan, transfer: RunConfig, data: LoadedData, policy: str,
                    deadline: float) -> tuple[RunConfig, BudgetPlan] | None:
    """Transfer learning instead of ``fast``, when the rule says so; None keeps ``fast``.

    The rule, from ``bench/transfer.py`` (CIFAR-10 on 2 cores): with 100 images per class the
    ImageNet head at 96 px scored 64.5% against ``fast``'s 54.2% in four times the time; with the
    full 5,000 per class, ``fast`` reached 85-86% in 10 minutes against the head's 73.9%. So transfer
    when the training set has at most ``TRANSFER_MAX_PER_CLASS`` images per class and the budget
    buys it at least one epoch at the speed measured here. Both speeds go into run.json. Budgets too
    short to measure both (under about 3 minutes) keep ``fast``.
    """
    counts = np.bincount(data.split_rows("train")[1], minlength=len(data.class_names))
    per_class = int(np.median(counts)) if len(counts) else 0
    if per_class > TRANSFER_MAX_PER_CLASS:  # decided without measuring: the probe's time stays with training
        _keep_fast(plan, f"transfer when at most {TRANSFER_MAX_PER_CLASS:,} training images per class; here "
                         f"{per_class:,} per class (not probed)")
        return None
    batches = make_batches(data, transfer)[0]
    transfer_plan = _new_plan(transfer, data)
    rate = _probe(transfer, data, batches, policy, transfer_plan)
    plan.probes[transfer.model.name] = transfer_plan.probes[transfer.model.name] = rate
    epochs = transfer_plan.epochs_affordable(rate, deadline - time.monotonic())
    rule = (f"transfer when at most {TRANSFER_MAX_PER_CLASS:,} training images per class and at least 1 epoch "
            f"affordable; here {per_class:,} per class, {_epochs(epochs)} epochs of {transfer.model.name} at "
            f"{rate.train:,.0f} images/s")
    if per_class > TRANSFER_MAX_PER_CLASS or epochs < 1:
        _keep_fast(plan, rule)
        return None
    transfer_plan.probes.update(plan.probes)
    transfer_plan.approach = {"chosen": transfer.model.name, "rule": rule}
    transfer_plan.reason = f"{_epochs(epochs)} epochs affordable at {rate.train:,.0f} training images/s measured here"
    say(f"approach for this budget: [bold]transfer learning from {transfer.model.name}[/] ({rule}; --model to choose)")
    return transfer, transfer_plan


def _keep_fast(plan: BudgetPlan, rule: str) -> None:
    """``fast`` from scratch rather than transfer learning: recorded in run.json and said, with the rule."""
    plan.approach = {"chosen": "fast", "rule": rule}
    say(f"approach for this budget: [bold]fast from scratch[/] ({esc(rule)}; --model to choose)")


def choose_width(plan: BudgetPlan, probe: Callable[[str], Throughput], deadline: float) -> str:
    """The widest width of ``fast`` whose affordable epochs reach its ``MIN_EPOCHS``, probing as needed.

    Widths are probed narrowest first (``probe(width)`` measures one, and its cost comes out of the
    budget); a wider one is not probed when even the narrower one's speed could not buy its epochs,
    or when its probe would take measuring past ``PROBE_SHARE`` of the budget.
    """
    chosen: str | None = None
    plan.why_not_wider = ""
    for width in sorted(MIN_EPOCHS, key=MIN_EPOCHS.get):
        need = f"{width} needs {MIN_EPOCHS[width]:g} epochs to pay off"
        if chosen is not None:
            narrower = plan.epochs_affordable(plan.probes[chosen], deadline - time.monotonic())
            if narrower < MIN_EPOCHS[width]:  # a wider model is slower: it cannot buy its epochs either
                plan.why_not_wider = f"{need}, and even {chosen} affords only {_epochs(narrower)} (not measured)"
                break
        spent = sum(rate.seconds for rate in plan.probes.values())
        if chosen is not None and spent + PROBE_GROWTH * plan.probes[chosen].seconds > PROBE_SHARE * plan.seconds:
            plan.why_not_wider = (f"{width} not measured: measuring it would take more than "
                                  f"{PROBE_SHARE:.0%} of this budget")
            break
        plan.probes[width] = probe(width)
        if chosen is not None:
            affordable = plan.epochs_affordable(plan.probes[width], deadline - time.monotonic())
            if affordable < MIN_EPOCHS[width]:
                plan.why_not_wider = (f"{need}; measured here it affords {_epochs(affordable)} at "
                                      f"{plan.probes[width].train:,.0f} images/s")
                break
        chosen = width
    assert chosen is not None
    return chosen


class TimeBudget(keras.callbacks.Callback):
    """Fits the one-cycle schedule to a wall-clock budget and stops training at the last step that fits.

    Args:
        deadline: ``time.monotonic()`` value by which ``cnnkit train`` must be done.
        learning_rate: the peak rate of the one-cycle schedule.
        plan: the budget's plan (it prices the work after training).
        predict_rate: measured inference images per second (refined on later validation passes).
    """

    def __init__(self, deadline: float, learning_rate: float, plan: BudgetPlan, predict_rate: float) -> None:
        super().__init__()
        self.deadline, self.learning_rate, self.plan = deadline, learning_rate, plan
        self.predict_rate = predict_rate
        self.started: float | None = None
        self.steps = 0
        self.last_rate = 0.0  # the rate of the last step taken
        self.step_seconds = 0.0  # a running estimate of one step
        self._last_tick = 0.0
        self._test_started = 0.0
        self._epoch_started = 0.0
        self._test_ended = 0.0
        self._validation_passes = 0
        self.epoch_overhead = 0.0  # seconds an epoch spends outside its steps and validation (checkpoints)
        self.stopped: float | None = None  # when fit ended (its last validation pass and checkpoints done)
        self.most_epoch_overhead = 0.0  # the longest time between an epoch's validation pass and the next epoch

    @property
    def reserve(self) -> float:
        """The work after training, and the checkpoints of the epoch that stops."""
        return self.plan.reserve(self.predict_rate) + self.epoch_overhead

    @property
    def end(self) -> float:
        """When training must stop for the rest of the run to end by the deadline."""
        return self.deadline - self.reserve

    def progress(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.started is None:
            return 0.0
        return min(1.0, (now - self.started) / max(self.end - self.started, 1e-9))

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def validation_seconds(self) -> float:
        return self.plan.validation_images / max(self.predict_rate, 1e-9)

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self._last_tick = time.monotonic()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.stopped = time.monotonic()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if keras.backend.backend() == "jax":
            # JAX's trainer fetches variables only at an epoch's first step unless they were synced:
            # sync so that the new rate (an optimizer variable) reaches this step.
            self.model.jax_state_sync()
        self.last_rate = onecycle_rate(self.progress(), self.learning_rate)
        self.model.optimizer.learning_rate = self.last_rate

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        seconds, self._last_tick = now - self._last_tick, now
        self.steps += 1
        steps_per_epoch = (self.params or {}).get("steps")
        # An epoch's first step may compile (the run's first; a new side under progressive resizing).
        if self.steps > 1 and (batch > 0 or steps_per_epoch == 1):
            self.step_seconds = seconds if self.step_seconds == 0 else 0.7 * self.step_seconds + 0.3 * seconds
        needed = self.step_seconds
        if steps_per_epoch and batch + 1 >= steps_per_epoch:
            # the epoch's validation pass and checkpoints come before the next step
            needed += self.validation_seconds() + self.epoch_overhead
        if now + needed >= self.end:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        if self._epoch_started:  # what the last epoch spent after its validation pass (checkpoints, callbacks)
            self.epoch_overhead = max(0.0, now - self._test_ended)
            self.most_epoch_overhead = max(self.most_epoch_overhead, self.epoch_overhead)
        self._last_tick = self._epoch_started = now

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._test_started = time.monotonic()

    def on_test_end(self, logs: dict | None = None) -> None:
        self._test_ended = time.monotonic()
        seconds = self._test_ended - self._test_started
        self._validation_passes += 1
        if self._validation_passes > 1 and self.plan.validation_images and seconds > 0:
            # This machine's inference speed as it is now (the first pass compiles: the probe's figure stands).
            self.predict_rate = self.plan.validation_images / seconds

    def record(self) -> dict[str, Any]:
        """run.json's ``time_budget``: the plan, and what training used."""
        stopped = self.stopped or time.monotonic()
        return {**self.plan.to_dict(),
                "training_seconds": round(stopped - self.started, 1) if self.started else 0.0,
                # on the budget's clock (from the start of the run): when training stopped
                "training_ended_at_s": round(stopped - (self.deadline - self.plan.seconds), 1),
                "reserve_seconds": round(self.reserve, 1), "steps": self.steps,
                "most_epoch_overhead_s": round(self.most_epoch_overhead, 1),  # checkpoints between epochs
                "peak_learning_rate": self.learning_rate, "last_learning_rate": self.last_rate}


def evaluation_speed(model: keras.Model, batches: ArrayBatches, rate: Throughput, steps: int = PROBE_STEPS) -> float:
    """How fast the final, float32 model infers relative to ``rate.predict`` (1.0 when ``model`` is float32).

    Training may run in mixed bfloat16, but the final evaluation runs on the float32 model that is saved
    (``as_float32``): on a CPU with bfloat16 that is slower, and the reserve must price it. Times a
    float32 copy of ``model`` on real batches (after one pass that compiles).
    """
    final = as_float32(model)
    if final is model:
        return 1.0
    speed = _images_per_second(_inference(final), batches, steps)
    del final
    gc.collect()
    return speed / max(rate.predict, 1e-9)


def make_time_budget(deadline: float, learning_rate: float, cfg: RunConfig, plan: BudgetPlan,
                     model: keras.Model | None = None, batches: ArrayBatches | None = None) -> TimeBudget:
    """The budget callback for a planned run; with ``model`` and ``batches``, the speed of its final
    (float32) form is measured first (``evaluation_speed``), and the reserve priced with it.

    Raises:
        ConfigError: decoding and measuring already spent most of the budget.
    """
    probe = plan.probes[plan.width or cfg.model.name]
    if model is not None and batches is not None and len(batches):
        plan.evaluation_speed = evaluation_speed(model, batches, probe)
    budget = TimeBudget(deadline, learning_rate, plan, probe.predict)
    if budget.remaining() < 0.2 * cfg.train.time_budget:
        spent = cfg.train.time_budget - (deadline - time.monotonic())
        raise ConfigError(
            f"--time-budget {clock(cfg.train.time_budget)} is too short for this data on this machine: decoding and "
            f"measuring took {clock(spent)}, and the final evaluation needs about {clock(budget.reserve)} "
            f"(at {budget.predict_rate:,.0f} images/s). Give a larger budget. The decoded images are cached, so a "
            f"second run starts sooner. Received: time_budget={cfg.train.time_budget:g}")
    return budget


def clock(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``42`` -> ``42s``."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
