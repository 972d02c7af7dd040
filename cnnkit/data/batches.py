"""Batches stage: uint8 cache rows -> shuffled (images, labels) batches for ``model.fit``.

One pipeline for every backend: a ``keras.utils.PyDataset`` over the memory-mapped cache. Each
epoch is reshuffled from the run's seed; within a batch, rows are read in ascending order so the
memmap is read sequentially where possible. Pixels stay uint8 (raw 0-255): scaling is a layer
inside the model.
"""

from __future__ import annotations

import math

import keras
import numpy as np


class ArrayBatches(keras.utils.PyDataset):
    """Batches of ``images[rows]`` with ``labels``, reshuffled every epoch when ``shuffle``.

    Args:
        images: (N, H, W, C) uint8 array or memmap.
        rows: rows of ``images`` in this dataset.
        labels: class index per row (or ``None`` to yield images only).
        batch_size: images per batch; the last batch may be smaller.
        shuffle: reshuffle the order each epoch.
        seed: seed of the shuffle.
    """

    def __init__(
        self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None, batch_size: int,
        shuffle: bool = False, seed: int = 0,
    ) -> None:
        super().__init__(workers=1, use_multiprocessing=False)
        self.images = images
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = np.arange(len(self.rows))
        if shuffle:
            self._order = self._rng.permutation(len(self.rows))

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, index: int):
        pick = np.sort(self._order[index * self.batch_size : (index + 1) * self.batch_size])
        x = np.asarray(self.images[self.rows[pick]])
        if self.labels is None:
            return (x,)
        return x, self.labels[pick]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self._order = self._rng.permutation(len(self.rows))
