"""Serve stage: the loaded model and everything a request needs (``app.state.served``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from cnnkit.engines import open_engine
from cnnkit.predict import Predictor
from cnnkit.registry import ModelSource
from cnnkit.serve.batching import MicroBatcher
from cnnkit.serve.inputs import RequestError
from cnnkit.serve.settings import ServeSettings


class Served:
    """One served model: its ``Predictor`` (the training decoder, the run's calibration) and batcher.

    Calibration (temperature and abstain threshold) is the Predictor's own, read from the model's
    metadata, where ``cnnkit calibrate`` stores it: served answers equal ``cnnkit predict``'s.
    The engine (``settings.engine``) runs the forward pass: Keras, or ONNX Runtime without Keras.
    """

    def __init__(self, source: ModelSource, settings: ServeSettings) -> None:
        engine = open_engine(source.path, settings.engine)
        meta = engine.meta
        if settings.max_pixels is not None:
            meta = dataclasses.replace(meta, max_pixels=min(meta.max_pixels, settings.max_pixels))
        self.source, self.settings = source, settings
        self.predictor = Predictor.from_engine(engine, meta, batch_size=max(settings.max_batch_size, 1))
        self.batcher: MicroBatcher | None = None
        self.ready = False

    @property
    def engine(self) -> str:
        """The engine's name: "keras" or "onnxruntime"."""
        return self.predictor.engine.name

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

    async def start(self, on_batch: Callable[[int], None] | None = None) -> None:
        """Start the model queue: micro-batches, or one request per model call with batching off (no ``on_batch``).

        Either way every model call runs on the queue's one thread, behind its bound and deadline.
        """
        s = self.settings
        self.batcher = MicroBatcher(self.predictor.predict_arrays, s.max_batch_size if s.batching else 1,
                                    s.max_wait_ms if s.batching else 0.0, on_batch if s.batching else None,
                                    max_queue=s.max_queue, timeout_s=s.request_timeout_s)
        await self.batcher.start()

    async def stop(self) -> None:
        """Refuse new requests; answer the queued ones for up to ``shutdown_timeout_s``, then refuse the rest."""
        if self.batcher is not None:
            await self.batcher.stop(self.settings.shutdown_timeout_s)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (N, num_classes), through the model queue (micro-batched when on)."""
        return await self._queue().predict(images)

    async def run_alone(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model thread, alone: for model work other than ``predict`` (Grad-CAM)."""
        return await self._queue().run_alone(fn, *args)

    def _queue(self) -> MicroBatcher:
        if self.batcher is None:
            raise RequestError(503, "The model is still loading; retry when /readyz answers 200.")
        return self.batcher
