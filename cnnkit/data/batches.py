"""Batches stage: uint8 cache rows -> shuffled (images, labels) batches for ``model.fit``.

One pipeline for every backend: a ``keras.utils.PyDataset`` over the memory-mapped cache. Each
epoch is reshuffled from the run's seed; within a batch, rows are read in ascending order so the
memmap is read sequentially where possible. Pixels stay uint8 (raw 0-255): scaling is a layer
inside the model.

``BatchAugment`` is augmentation done here, on whole uint8 batches with numpy, instead of by
layers in the model (the ``flip-translate`` preset): a batch of 512 CIFAR images takes about a
millisecond, against some 10% of a training step for Keras's augmentation layers on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np


@dataclass(frozen=True)
class BatchAugment:
    """Horizontal flip + translation of whole uint8 batches.

    Attributes:
        flip: "alternating" (random in the first epoch, then each image flips every epoch, so it
            is seen both ways in any two epochs: airbench's trick), "random" or "none".
        translate: largest shift as a fraction of the side (1/16 = 2 px at 32 px); edges are
            reflect-padded. 0 = none.
    """

    flip: str = "alternating"
    translate: float = 1 / 16

    def pad(self, height: int, width: int) -> int:
        return max(1, round(min(height, width) * self.translate)) if self.translate > 0 else 0

    def __call__(self, images: np.ndarray, flips: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented copy of ``images`` (N, H, W, C); ``flips`` says which images to mirror."""
        n, height, width = images.shape[:3]
        pad = self.pad(height, width)
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect") if pad else images
        shifts = 2 * pad + 1
        dy = rng.integers(0, shifts, n)
        dx = rng.integers(0, shifts, n)
        # One slice per (flip, dy, dx) group: a few dozen copies instead of a per-pixel gather.
        code = (flips.astype(np.int64) * shifts + dy) * shifts + dx
        out = np.empty_like(images)
        for value in np.unique(code):
            idx = np.flatnonzero(code == value)
            flip, rest = divmod(int(value), shifts * shifts)
            y0, x0 = divmod(rest, shifts)
            crop = padded[idx, y0 : y0 + height, x0 : x0 + width]
            out[idx] = crop[:, :, ::-1] if flip else crop
        return out


TTA_MODES = ("flip", "flip+crop")


# How many views each test-time augmentation mode passes through the model.
TTA_VIEW_COUNT = {None: 1, "flip": 2, "flip+crop": 6}


def tta_views(images: np.ndarray, mode: str | None) -> list[np.ndarray]:
    """The test-time views of a uint8 batch (N, H, W, C): the images first, then their transforms.

    ``flip``: + the horizontal mirror. ``flip+crop``: + four crops shifted by 1/16 of the size
    (reflect-padded, so every view keeps the input size), the usual CIFAR-style translation.
    ``None``: the images alone.
    """
    views = [images]
    if mode in ("flip", "flip+crop"):
        views.append(np.ascontiguousarray(images[:, :, ::-1]))
    if mode == "flip+crop":
        pad = max(1, round(min(images.shape[1:3]) / 16))
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        h, w = images.shape[1:3]
        views += [padded[:, dy : dy + h, dx : dx + w] for dy in (0, 2 * pad) for dx in (0, 2 * pad)]
    return views


# The second number of each random stream's key, one per use, so no two streams share a key (numpy's
# SeedSequence ignores trailing zeros: [seed, 1] and [seed, 1, 0] would be one stream).
_ORDER, _FIRST_FLIPS, _FLIPS, _SHIFTS = 10, 11, 12, 13


class ArrayBatches(keras.utils.PyDataset):
    """Batches of ``images[rows]`` with ``labels``, reshuffled every epoch when ``shuffle``.

    An epoch's order, flips and translations are a function of the seed and the epoch's number
    alone, so a resumed run sees the batches an uninterrupted one would have. ``epoch`` is the
    epoch batches are drawn from: each ``on_epoch_begin`` (Keras calls it as an epoch starts) moves
    it to the next, from 0, or from the epoch given to ``start_at`` (a resumed run's).

    Args:
        images: (N, H, W, C) uint8 array or memmap.
        rows: rows of ``images`` in this dataset.
        labels: class index per row (or ``None`` to yield images only).
        batch_size: images per batch; the last batch may be smaller.
        shuffle: reshuffle the order each epoch.
        seed: seed of the shuffle (and of the augmentation).
        augment: batch augmentation (training only), or None.
        multiple_of: every batch holds a multiple of this many images (the devices sharing it):
            the last, partial batch is cut down to one (up to ``multiple_of - 1`` images of the
            epoch left out; which ones changes with each shuffle), or dropped.
    """

    def __init__(
        self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None, batch_size: int,
        shuffle: bool = False, seed: int = 0, augment: BatchAugment | None = None, multiple_of: int = 1,
    ) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0
        self._upcoming = 0  # the epoch the next on_epoch_begin starts
        full, rest = divmod(len(self.rows), self.batch_size)
        self._end = full * self.batch_size + rest // multiple_of * multiple_of  # images used per epoch
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (order, flips), the latest few

    def __len__(self) -> int:
        return math.ceil(self._end / self.batch_size)

    def __getitem__(self, index: int):
        return self.batch(self.epoch, index)

    def batch(self, epoch: int, index: int):
        """Batch ``index`` of epoch ``epoch``: ``(images, labels)``, or ``(images,)`` without labels."""
        order, flips = self._epoch_plan(epoch)
        pick = np.sort(order[index * self.batch_size : min((index + 1) * self.batch_size, self._end)])
        x = np.asarray(self.images[self.rows[pick]])
        if self.augment is not None:
            x = self.augment(x, flips[pick], np.random.default_rng([self.seed, _SHIFTS, epoch, index]))
        if self.labels is None:
            return (x,)
        return x, self.labels[pick]

    def start_at(self, epoch: int) -> None:
        """Make ``epoch`` the next epoch to begin (a fit from ``initial_epoch=epoch``)."""
        self._upcoming = epoch

    def on_epoch_begin(self) -> None:
        self.epoch, self._upcoming = self._upcoming, self._upcoming + 1

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The order of the rows and which of them are mirrored, in ``epoch``."""
        plan = self._epochs.get(epoch)
        if plan is None:
            n = len(self.rows)
            order = np.random.default_rng([self.seed, _ORDER, epoch]).permutation(n) if self.shuffle else np.arange(n)
            flip = "none" if self.augment is None else self.augment.flip
            if flip == "alternating":  # random in epoch 0, then each image flips every epoch
                flips = (np.random.default_rng([self.seed, _FIRST_FLIPS]).random(n) < 0.5) ^ bool(epoch % 2)
            elif flip == "random":
                flips = np.random.default_rng([self.seed, _FLIPS, epoch]).random(n) < 0.5
            else:
                flips = np.zeros(n, dtype=bool)
            plan = order, flips
            # Asked for by the training step and by a prefetching thread: keep the latest few.
            self._epochs = {e: p for e, p in self._epochs.items() if e >= epoch - 2} | {epoch: plan}
        return plan
