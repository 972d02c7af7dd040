"""Micro-batching: concurrent requests' images gathered into one model call.

A request puts its decoded images (N, H, W, C) on a queue and awaits a future. One loop takes the
first waiting request, then every request already queued, then waits up to ``max_wait_ms`` for
more, until ``max_batch_size`` images are gathered; it runs the model once on a single worker
thread (the event loop never blocks) and hands each request its rows. Under load, requests that
arrive while the model runs form the next batch at once, so batching needs no waiting then.
A request is never split: one with more images than ``max_batch_size`` runs alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable

import numpy as np


class MicroBatcher:
    """Gathers concurrent ``predict`` calls into batched calls of ``predict_fn``.

    Args:
        predict_fn: (N, H, W, C) uint8 -> (N, num_classes) probabilities; called on one thread.
        max_batch_size: most images per model call.
        max_wait_ms: how long the first request of a batch may wait for others.
        on_batch: called with each batch's size (for metrics).
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None) -> None:
        self.predict_fn = predict_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cnnkit-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for ``images``, computed in a batch with other requests' images."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    async def _gather(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        assert self._queue is not None
        items = [await self._queue.get()]
        count = len(items[0][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while count < self.max_batch_size:
            if not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            items.append(item)
            count += len(item[0])
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            live = [(images, fut) for images, fut in items if not fut.done()]  # drop disconnected clients
            if not live:
                continue
            batch = np.concatenate([images for images, _ in live])
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                probs = await loop.run_in_executor(self._executor, self.predict_fn, batch)
            except Exception as exc:  # the model failed: every waiting request gets the error
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            start = 0
            for images, fut in live:
                if not fut.done():
                    fut.set_result(probs[start : start + len(images)])
                start += len(images)
