"""Serve stage: the loaded model and everything a request needs (``app.state.served``)."""

from __future__ import annotations

import dataclasses

import numpy as np
from starlette.concurrency import run_in_threadpool

from cnnkit.models.saving import load_model
from cnnkit.predict import Predictor
from cnnkit.registry import ModelSource
from cnnkit.serve.batching import MicroBatcher
from cnnkit.serve.settings import ServeSettings


class Served:
    """One served model: its ``Predictor`` (the training decoder, the run's calibration) and batcher.

    Calibration (temperature and abstain threshold) is the Predictor's own, read from the model's
    metadata, where ``cnnkit calibrate`` stores it: served answers equal ``cnnkit predict``'s.
    """

    def __init__(self, source: ModelSource, settings: ServeSettings) -> None:
        model, meta = load_model(source.path)
        if settings.max_pixels is not None:
            meta = dataclasses.replace(meta, max_pixels=min(meta.max_pixels, settings.max_pixels))
        self.source, self.settings = source, settings
        self.predictor = Predictor.from_model(model, meta, batch_size=max(settings.max_batch_size, 1))
        self.batcher: MicroBatcher | None = None
        self.ready = False

    @property
    def temperature(self) -> float:
        return self.predictor.temperature

    @property
    def min_confidence(self) -> float | None:
        return self.predictor.min_confidence

    def warm_up(self) -> None:
        """Trace the model for a single image and a full batch, so the first requests are not slow."""
        for n in sorted({1, self.settings.max_batch_size}):
            self.predictor.predict_arrays(np.zeros((n, *self.predictor.input_shape), np.uint8))

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (N, num_classes), micro-batched with other requests when batching is on."""
        if self.batcher is not None:
            return await self.batcher.predict(images)
        return await run_in_threadpool(self.predictor.predict_arrays, images)
