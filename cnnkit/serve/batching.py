"""Serve stage: every model call of the service, through one bounded queue, on one thread.

A request puts its decoded images (N, H, W, C) on the queue and awaits its answer. One loop takes
the first waiting request, then every request already queued, then waits up to ``max_wait_ms`` for
more, until ``max_batch_size`` images are gathered; it runs the model once on its single worker
thread (the event loop never blocks) and hands each request its rows. Under load, requests that
arrive while the model runs form the next batch at once. A request is never split: one with more
images than ``max_batch_size`` runs alone. With ``max_batch_size=1`` (batching off) each request
is its own model call, still on that one thread.

What keeps it from hanging or failing under load:

- **One model call at a time.** Predictions and other model work (``run_alone``: Grad-CAM for
  ``:explain``) all run on the one thread; on JAX, ``predict_on_batch`` mutates the model's state.
- **Back-pressure.** At most ``max_queue`` images wait; a request that would pass it is refused at
  once with ``Overloaded`` (429 + ``Retry-After``, from the measured model throughput).
- **Deadlines.** A request not answered ``timeout_s`` after it was queued gets ``DeadlineExceeded``
  (504); the loop skips requests whose clients gave up.
- **A loop that survives.** Any exception fails only the requests concerned: when a batch fails,
  its requests are run again one by one, so one bad request cannot fail its neighbours, and the
  loop carries on whatever happens (a bug outside the model call included).
- **Graceful shutdown.** ``stop`` refuses new requests (``ShuttingDown``, 503), answers what is
  queued for up to ``drain_s``, then refuses the rest: no request is left waiting. It returns only
  once every caller of ``predict`` holds its answer or its refusal (not merely once the answers are
  set: a caller wakes a few event-loop turns after its answer).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnkit.serve.inputs import RequestError

logger = logging.getLogger("cnnkit.serve")


class Overloaded(RequestError):
    """429: the queue is full; ``Retry-After`` says when to come back."""

    def __init__(self, queued: int, retry_after_s: int) -> None:
        super().__init__(429, f"The server is overloaded: {queued} images are waiting for the model (max_queue / "
                              f"CNNKIT_MAX_QUEUE). Retry after {retry_after_s} s, or send fewer images at once.",
                         headers={"Retry-After": str(retry_after_s)})


class DeadlineExceeded(RequestError):
    """504: no answer within the request deadline."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(504, f"No answer from the model within {timeout_s:g} s (request_timeout_s / "
                              "CNNKIT_REQUEST_TIMEOUT_S); the server is busy. Retry later.")


class ShuttingDown(RequestError):
    """503: the server is stopping and takes no more requests."""

    def __init__(self) -> None:
        super().__init__(503, "The server is shutting down and takes no new requests; retry on another replica "
                              "or once it is back.")


@dataclass(eq=False)
class _Job:
    """One request's work: ``images`` to predict in a batch, or ``call`` to run alone on the model thread."""

    size: int
    images: np.ndarray | None = None
    call: Callable[[], Any] | None = None
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    queued: bool = True  # counted in the queue until the loop takes it (or its client gives up)


class MicroBatcher:
    """Gathers concurrent ``predict`` calls into batched calls of ``predict_fn``, on one thread.

    Args:
        predict_fn: (N, H, W, C) uint8 -> (N, num_classes) probabilities; called on one thread.
        max_batch_size: most images per model call (1: batching off, one call per request).
        max_wait_ms: how long the first request of a batch may wait for others.
        on_batch: called with each batch's size (for metrics); its errors are logged, never raised.
        max_queue: most images waiting for the model; past it, requests get ``Overloaded`` (429).
        timeout_s: a request not answered this long after it was queued gets ``DeadlineExceeded`` (504).

    Example:
        >>> batcher = MicroBatcher(lambda x: np.full((len(x), 2), 0.5), max_batch_size=8)
        >>> async def main():
        ...     await batcher.start()
        ...     try:
        ...         return await batcher.predict(np.zeros((3, 4, 4, 3), np.uint8))
        ...     finally:
        ...         await batcher.stop()
        >>> asyncio.run(main()).shape
        (3, 2)
    """

    def __init__(self, predict_fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None, *,
                 max_queue: int = 512, timeout_s: float = 30.0) -> None:
        self.predict_fn = predict_fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._pending: collections.deque[_Job] = collections.deque()
        self._queued = 0  # images in _pending whose clients still wait
        self._running: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._callers = 0  # _submit calls not yet returned to their caller
        self._callers_gone: asyncio.Event | None = None  # set while _callers == 0
        self._images_per_s = 0.0  # measured model throughput, for Retry-After
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cnnkit-model")

    @property
    def queued(self) -> int:
        """Images waiting for the model (not counting the batch being computed)."""
        return self._queued

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._callers_gone = asyncio.Event()
        self._callers_gone.set()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cnnkit-batcher")

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for ``images``, computed in a batch with other requests' images.

        Raises:
            Overloaded (429), DeadlineExceeded (504), ShuttingDown (503); or the model's own error.
        """
        return await self._submit(_Job(len(images), images=images))

    async def run_alone(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model thread, with no other model call at the same time (e.g. Grad-CAM)."""
        return await self._submit(_Job(1, call=lambda: fn(*args)))

    async def stop(self, drain_s: float = 10.0) -> None:
        """Refuse new requests, answer the queued ones for up to ``drain_s`` seconds, refuse the rest."""
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_s
        if self._task is not None and not self._task.done() and self._callers_gone is not None:
            try:  # every caller answered (the loop keeps serving meanwhile), or the drain time is up
                await asyncio.wait_for(self._callers_gone.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                pass
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in [*self._running, *self._pending]:
            _settle(job, error=ShuttingDown())
        self._pending.clear()
        self._queued = 0
        if self._callers_gone is not None:  # the refused callers wake and return within a few loop turns
            try:
                await asyncio.wait_for(self._callers_gone.wait(), 1.0)
            except asyncio.TimeoutError:
                logger.warning("cnnkit batching: %d callers still waiting after shutdown", self._callers)
        self._executor.shutdown(wait=False)

    # -- the request side ------------------------------------------------------------------------

    async def _submit(self, job: _Job) -> Any:
        if self._task is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        if self._closing or self._task.done():
            raise ShuttingDown()
        if self._queued and self._queued + job.size > self.max_queue:  # an empty queue takes any request
            raise Overloaded(self._queued, self._retry_after_s())
        job.future = asyncio.get_running_loop().create_future()
        self._pending.append(job)
        self._queued += job.size
        self._wake.set()
        self._callers += 1
        self._callers_gone.clear()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(self.timeout_s) from None
        finally:  # answered, timed out, or the client went away (cancelled): the loop skips it from now on
            if not job.future.done():
                job.future.cancel()
            self._release(job)
            self._callers -= 1
            if not self._callers:
                self._callers_gone.set()

    def _release(self, job: _Job) -> None:
        if job.queued:
            job.queued = False
            self._queued -= job.size

    def _retry_after_s(self) -> int:
        if self._images_per_s <= 0:
            return 1
        return max(1, min(60, math.ceil(self._queued / self._images_per_s)))

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._running = []  # the jobs taken off the queue, until answered (stop() answers them if cut short)
            try:
                await self._gather()
                await self._process(self._running)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug outside the model call: fail these requests only, keep serving
                logger.exception("cnnkit batching loop: %s", exc)
                for job in self._running:
                    _settle(job, error=exc)

    async def _next(self, timeout_s: float | None) -> _Job | None:
        """The next job whose client still waits; None after ``timeout_s`` (None: wait for ever)."""
        loop = asyncio.get_running_loop()
        until = None if timeout_s is None else loop.time() + timeout_s
        while True:
            while self._pending:
                job = self._pending[0]
                if job.call is not None and until is not None:  # never mixes into a batch: runs on its own
                    return None
                self._pending.popleft()
                self._release(job)
                if not job.future.done():
                    self._running.append(job)
                    return job
            self._wake.clear()
            if until is None:
                await self._wake.wait()
                continue
            remaining = until - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    async def _gather(self) -> None:
        """Take the next job, then more until ``max_batch_size`` images or ``max_wait_ms``, into ``_running``."""
        first = await self._next(None)
        if first.call is not None:
            return
        count = first.size
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while count < self.max_batch_size:
            job = await self._next(max(0.0, deadline - asyncio.get_running_loop().time()))
            if job is None:
                break
            count += job.size

    async def _process(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if not job.future.done()]
        if not live:
            return
        if live[0].call is not None:
            try:
                _settle(live[0], result=await self._on_model_thread(live[0].call))
            except Exception as exc:
                _settle(live[0], error=exc)
            return
        if self.on_batch is not None:
            try:
                self.on_batch(sum(job.size for job in live))
            except Exception:  # metrics never fail a request
                logger.exception("cnnkit batching: on_batch failed")
        try:
            probs = await self._predict([job.images for job in live])
        except Exception as exc:
            if len(live) == 1:
                _settle(live[0], error=exc)
                return
            # Isolate: one by one, so only the requests that fail on their own get an error.
            for job in live:
                if not job.future.done():
                    try:
                        _settle(job, result=await self._predict([job.images]))
                    except Exception as single:
                        _settle(job, error=single)
            return
        start = 0
        for job in live:
            _settle(job, result=probs[start : start + job.size])
            start += job.size

    async def _predict(self, parts: list[np.ndarray]) -> np.ndarray:
        batch = np.concatenate(parts)
        started = time.perf_counter()
        probs = await self._on_model_thread(lambda: self.predict_fn(batch))
        if len(probs) != len(batch):
            raise RuntimeError(f"The model returned {len(probs)} rows for {len(batch)} images.")
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            rate = len(batch) / elapsed
            self._images_per_s = rate if self._images_per_s == 0 else 0.8 * self._images_per_s + 0.2 * rate
        return probs

    async def _on_model_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)


def _settle(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a job unless its client already gave up (a cancelled or answered future)."""
    if job.future is None or job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)
