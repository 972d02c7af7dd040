"""The model queue (``MicroBatcher``) with fake slow or failing models: what is under test is the queue.

Each fake maps an image to its first pixel value, so every answer shows whose images it came from.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from cnnkit.serve.batching import DeadlineExceeded, MicroBatcher, Overloaded, ShuttingDown


def images(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, 2, 2, 1), value, np.uint8)


class FakeModel:
    """Returns each image's first pixel as its 'probability'; records calls, threads and overlaps."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.delay_s, self.fail_on = delay_s, fail_on
        self.calls: list[int] = []
        self.threads: set[int] = set()
        self.active = self.most_active = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.threads.add(threading.get_ident())

    def leave(self) -> None:
        with self._lock:
            self.active -= 1

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.enter()
        try:
            time.sleep(self.delay_s)
            self.calls.append(len(batch))
            if self.fail_on is not None and np.any(batch == self.fail_on):
                raise ValueError(f"the model cannot take {self.fail_on}")
            return batch.reshape(len(batch), -1)[:, :1].astype(np.float32)
        finally:
            self.leave()


def run(coro_fn, batcher: MicroBatcher):
    """Start the batcher, run ``coro_fn(batcher)``, stop it; returns what the coroutine returned."""

    async def main():
        await batcher.start()
        try:
            return await coro_fn(batcher)
        finally:
            await batcher.stop(drain_s=1.0)

    return asyncio.run(main())


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    model = FakeModel(delay_s=0.01)

    async def go(b):
        return await asyncio.gather(*(b.predict(images(v, n=1 + v % 3)) for v in range(1, 13)))

    results = run(go, MicroBatcher(model, max_batch_size=8, max_wait_ms=20))
    for v, probs in zip(range(1, 13), results):
        assert probs.ravel().tolist() == [v] * (1 + v % 3)
    assert len(model.calls) < 12 and max(model.calls) <= 8 + 2  # batched; a request is never split


def test_a_slow_model_answers_504_and_skips_requests_whose_clients_gave_up():
    model = FakeModel(delay_s=0.3)

    async def go(b):
        first = asyncio.ensure_future(b.predict(images(1)))  # occupies the model for 0.3 s
        await asyncio.sleep(0.02)
        with pytest.raises(DeadlineExceeded) as late:
            await b.predict(images(2))  # waits behind it: over the 0.1 s deadline
        assert late.value.status == 504 and "request_timeout_s" in late.value.message
        with pytest.raises(DeadlineExceeded):
            await first
        await asyncio.sleep(0.4)
        return b.queued

    model_batcher = MicroBatcher(model, max_batch_size=1, max_wait_ms=0, timeout_s=0.1)
    assert run(go, model_batcher) == 0
    assert model.calls == [1]  # the second request timed out in the queue: never computed


def test_a_full_queue_answers_429_with_retry_after_at_once():
    model = FakeModel(delay_s=0.2)

    async def go(b):
        running = asyncio.ensure_future(b.predict(images(1, n=3)))
        await asyncio.sleep(0.05)  # now on the model: the queue is empty again
        queued = [asyncio.ensure_future(b.predict(images(2, n=2))) for _ in range(2)]  # 4 images wait
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as full:
            await b.predict(images(3))
        assert time.perf_counter() - started < 0.05  # refused at once, not after waiting
        assert full.value.status == 429 and int(full.value.headers["Retry-After"]) >= 1
        assert "CNNKIT_MAX_QUEUE" in full.value.message
        done = await asyncio.gather(running, *queued)
        return [r.ravel().tolist() for r in done]

    assert run(go, MicroBatcher(model, max_batch_size=1, max_wait_ms=0, max_queue=4)) == [[1] * 3, [2] * 2, [2] * 2]


def test_an_empty_queue_takes_a_request_larger_than_the_bound():
    async def go(b):
        return await b.predict(images(5, n=10))

    assert run(go, MicroBatcher(FakeModel(), max_queue=4)).shape == (10, 1)


def test_a_failing_batch_fails_only_the_request_concerned():
    model = FakeModel(delay_s=0.01, fail_on=66)

    async def go(b):
        return await asyncio.gather(*(b.predict(images(v)) for v in (1, 66, 3, 4)), return_exceptions=True)

    results = run(go, MicroBatcher(model, max_batch_size=8, max_wait_ms=50))
    assert isinstance(results[1], ValueError) and "cannot take 66" in str(results[1])
    assert [r.ravel().tolist() for i, r in enumerate(results) if i != 1] == [[1], [3], [4]]
    assert model.calls[0] == 4  # one batch first, then each request alone to find the one that fails


@pytest.mark.parametrize("break_it", ["on_batch", "row_count", "shapes"])
def test_the_loop_survives_errors_outside_the_model_call(break_it):
    model = FakeModel()
    predict_fn = (lambda batch: model(batch)[:-1]) if break_it == "row_count" else model

    def on_batch(size: int) -> None:
        raise RuntimeError("metrics are down")

    async def go(b):
        if break_it == "shapes":  # two requests whose images cannot be stacked into one batch
            odd = asyncio.gather(b.predict(images(1)), b.predict(np.zeros((1, 3, 3, 1), np.uint8)),
                                 return_exceptions=True)
            first = await odd
        else:
            first = await asyncio.gather(b.predict(images(1)), return_exceptions=True)
        if break_it == "row_count":
            b.predict_fn = model  # the model is fixed: the same loop serves again
        later = await b.predict(images(7))
        return first, later

    batcher = MicroBatcher(predict_fn, max_batch_size=8, max_wait_ms=20,
                           on_batch=on_batch if break_it == "on_batch" else None)
    first, later = run(go, batcher)
    if break_it == "row_count":
        assert isinstance(first[0], RuntimeError) and "1 images" in str(first[0])
    elif break_it == "shapes":  # isolated: each request alone succeeds
        assert [r.shape for r in first] == [(1, 1), (1, 1)]
    else:  # a failing metrics callback fails no request
        assert first[0].ravel().tolist() == [1]
    assert later.ravel().tolist() == [7]


def test_shutdown_answers_or_refuses_every_queued_request():
    model = FakeModel(delay_s=0.05)

    async def main():
        b = MicroBatcher(model, max_batch_size=1, max_wait_ms=0)
        await b.start()
        tasks = [asyncio.ensure_future(b.predict(images(v))) for v in range(1, 21)]  # 20 x 50 ms of work
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        await b.stop(drain_s=0.2)
        stopped_in = time.perf_counter() - started
        with pytest.raises(ShuttingDown) as refused:
            await b.predict(images(99))
        assert refused.value.status == 503
        done, pending = await asyncio.wait(tasks, timeout=1.0)
        return stopped_in, done, pending

    stopped_in, done, pending = asyncio.run(main())
    assert not pending and stopped_in < 0.5  # nothing left waiting; the drain is bounded
    answered = [t.result() for t in done if t.exception() is None]
    refused = [t.exception() for t in done if t.exception() is not None]
    assert 2 <= len(answered) < 20 and len(answered) + len(refused) == 20
    assert all(isinstance(e, ShuttingDown) for e in refused)


def test_a_clean_shutdown_answers_everything_queued():
    async def main():
        b = MicroBatcher(FakeModel(delay_s=0.01), max_batch_size=4, max_wait_ms=1)
        await b.start()
        tasks = [asyncio.ensure_future(b.predict(images(v))) for v in range(1, 11)]
        await asyncio.sleep(0)
        await b.stop(drain_s=5.0)
        return [t.result().ravel().tolist() for t in tasks]

    assert asyncio.run(main()) == [[v] for v in range(1, 11)]


@pytest.mark.parametrize("max_batch_size", [1, 8], ids=["batching-off", "batching-on"])
def test_model_calls_never_overlap_and_run_on_one_thread(max_batch_size):
    """Predictions and other model work (Grad-CAM for :explain) share one thread, one call at a time."""
    model = FakeModel(delay_s=0.005)

    def gradcam(batch: np.ndarray) -> str:
        model.enter()
        try:
            time.sleep(0.005)
            return "heatmap"
        finally:
            model.leave()

    async def go(b):
        work = [b.predict(images(v % 200)) for v in range(30)] + [b.run_alone(gradcam, images(1)) for _ in range(10)]
        return await asyncio.gather(*work)

    results = run(go, MicroBatcher(model, max_batch_size=max_batch_size, max_wait_ms=1))
    assert results[30:] == ["heatmap"] * 10
    assert model.most_active == 1 and len(model.threads) == 1
    if max_batch_size == 1:
        assert model.calls == [1] * 30  # batching off: one model call per request


def test_a_client_that_goes_away_does_not_disturb_the_others():
    model = FakeModel(delay_s=0.05)

    async def go(b):
        gone = asyncio.ensure_future(b.predict(images(1)))
        kept = asyncio.ensure_future(b.predict(images(2)))
        await asyncio.sleep(0.01)
        gone.cancel()  # what Starlette does when a client disconnects
        return await kept, b

    result, batcher = run(go, MicroBatcher(model, max_batch_size=1, max_wait_ms=0))
    assert result.ravel().tolist() == [2] and batcher.queued == 0
