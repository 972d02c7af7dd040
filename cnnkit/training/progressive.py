"""Training stage: progressive resizing (``--progressive``), the first epochs at a lower resolution.

``fast`` built with ``resizable=True`` starts with a ``ProgressiveResize`` layer that, in training,
downscales each batch to a side it is given. ``ProgressiveResizing`` (a callback) sets that side
at the start of every epoch from the progress of the run: ``progressive_side`` grows it in 4-pixel
steps from ``start`` times the image side to the full side by ``GROWN_BY`` of the run (the wall
clock of a time budget, or the epochs), after which training is at full size. A resumed run trains
at full size (its first part had the lower sides). A step at 24 px
costs about (24/32)^2 = 56% of one at 32 px, so the same time buys more epochs; the last half
trains at the size the model is evaluated at, and BatchNorm's statistics are re-estimated at it.

A change of side retraces the training step (one compilation per size: three for 0.75 at 32 px).
The layer is set back to full size when training ends, so evaluation sees the full size, and the
saved model is written without it (``cnnkit.models.fast.without_progressive``): a plain Keras
model that loads without cnnkit.
"""

from __future__ import annotations

import math
from typing import Callable

import keras

from cnnkit.models.fast import PROGRESSIVE_LAYER
from cnnkit.models.saving import all_layers

# The share of the run (time or epochs) by which the side has grown to full.
GROWN_BY = 0.5
# Sides are multiples of this many pixels (fewer sizes: fewer recompilations).
SIDE_STEP = 4
# The smallest side trained at: fast pools three times by 2, so 8 px still leaves one pixel.
MIN_SIDE = 8


def progressive_side(progress: float, start: float, full: int) -> int:
    """The side to train at, at ``progress`` (0 to 1) of the run, starting at ``start`` times ``full``.

    The first side is ``start * full`` rounded to the nearest multiple of ``SIDE_STEP`` (at least
    ``MIN_SIDE``); the sides below ``full`` share the first ``GROWN_BY`` of the run equally. Images
    too small for a lower side train at full size throughout.

    Example:
        >>> [progressive_side(p, 0.75, 32) for p in (0.0, 0.2, 0.3, 0.5, 0.9)]
        [24, 24, 28, 32, 32]
    """
    if start >= 1.0 or progress >= GROWN_BY:
        return full
    first = max(MIN_SIDE, round(start * full / SIDE_STEP) * SIDE_STEP)
    sizes = list(range(first, full, SIDE_STEP))  # the sizes below full, each for an equal share
    if not sizes:
        return full
    return sizes[min(len(sizes) - 1, math.floor(progress / GROWN_BY * len(sizes)))]


def schedule_text(start: float, full: int) -> str:
    """The schedule in words, for the run's log.

    Example:
        >>> schedule_text(0.75, 32)
        'training at 24, then 28 px over the first half of the run, then at the full 32 px'
    """
    sizes = sorted({progressive_side(GROWN_BY * i / 64, start, full) for i in range(64)} - {full})
    if not sizes:
        return f"training at the full {full} px throughout"
    steps = ", then ".join(f"{side}" for side in sizes)
    return f"training at {steps} px over the first {'half' if GROWN_BY == 0.5 else f'{GROWN_BY:.0%}'} of the run, " \
           f"then at the full {full} px"


def resize_layer(model: keras.Model):
    """The model's ``ProgressiveResize`` layer, or None."""
    return next((layer for layer in all_layers(model) if layer.name == PROGRESSIVE_LAYER), None)


class ProgressiveResizing(keras.callbacks.Callback):
    """Sets the training resolution of a resizable ``fast`` at each epoch's start.

    Args:
        start: the first side as a fraction of the full one (``TrainConfig.progressive``).
        full: the image size (height, width) the model is built for.
        progress: the share of the run done, 0 to 1 (the time budget's, or epochs done / planned).
    """

    def __init__(self, start: float, full: tuple[int, int], progress: Callable[[int], float]) -> None:
        super().__init__()
        self.start, self.full, self.progress = start, full, progress
        self.sides: list[int] = []  # the side of every epoch run, for run.json

    def _set(self, side: tuple[int, int] | None) -> None:
        layer = resize_layer(self.model)
        if layer is None or layer.side == side:
            return
        layer.side = side
        # The side is a Python attribute read when the step is traced: trace the step again.
        self.model.make_train_function(force=True)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        height, width = self.full
        side = progressive_side(self.progress(epoch), self.start, min(height, width))
        scale = side / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        self._set(None if size == tuple(self.full) else size)
        self.sides.append(side)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._set(None)
