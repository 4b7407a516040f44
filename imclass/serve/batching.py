"""Dynamic micro-batching: concurrent requests share one forward pass.

Each request's images join a queue; one worker takes the first waiting image, collects more for up to
``max_wait_ms`` or until ``max_batch`` images, runs ONE forward in a worker thread (off the event loop)
and answers every request from its rows. The queue is bounded: past ``max_queue`` waiting images a
request is refused with ``Overloaded`` (the service answers 503 with ``Retry-After``) instead of
growing without limit. ``enabled=False`` runs one forward per request (the baseline that
``bench/serve_load.py`` compares against), through the same single inference thread and queue bound.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["BatchStats", "MicroBatcher", "Overloaded"]


class Overloaded(RuntimeError):
    """The queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class BatchStats:
    """Counters for ``GET /health``: forward passes run, images classified, the largest batch, refusals."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    refused: int = 0

    def as_dict(self) -> dict:
        """The counters and the mean batch size as a JSON-ready dict."""
        mean = self.images / self.batches if self.batches else 0.0
        return {"batches": self.batches, "images": self.images, "largest_batch": self.largest_batch,
                "mean_batch": round(mean, 2), "refused": self.refused}


class MicroBatcher:
    """Queue images from concurrent requests and run them through ``predict_fn`` in shared batches.

    ``predict_fn`` maps a uint8 batch (N, C, H, W) to probabilities (N, K); it runs in one dedicated
    thread, so the model never sees two batches at once.
    """

    def __init__(self, predict_fn: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 256, enabled: bool = True, retry_after: int = 1) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"expected max_batch >= 1, max_queue >= 1 and max_wait_ms >= 0, received "
                             f"max_batch={max_batch}, max_queue={max_queue}, max_wait_ms={max_wait_ms}")
        self.predict_fn = predict_fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.enabled = enabled
        self.retry_after = retry_after
        self.stats = BatchStats()
        self._pending = 0  # images queued or being classified
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imclass-infer")
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def admit(self, n: int) -> "_Admitted":
        """Hold ``n`` places of the queue bound while the ``with`` block runs; ``Overloaded`` when they do not fit."""
        if self._pending + n > self.max_queue:
            self.stats.refused += 1
            raise Overloaded(f"the server is busy ({self._pending} images waiting, at most {self.max_queue}); "
                             f"retry in {self.retry_after} s", self.retry_after)
        return _Admitted(self, n)

    async def run_alone(self, fn: Callable[..., Any], *args: Any, weight: int = 1) -> Any:
        """``fn(*args)`` on the inference thread, between batches, admitted as ``weight`` images (e.g. Grad-CAM)."""
        with self.admit(weight):
            return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args))

    async def predict(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities (K,) for each (C, H, W) uint8 image, in order; ``Overloaded`` when the queue is full."""
        n = len(images)
        if n == 0:
            return []
        with self.admit(n):
            if not self.enabled:
                return await self._predict_alone(images)
            queue = self._ensure_worker()
            loop = asyncio.get_running_loop()
            futures = [loop.create_future() for _ in images]
            for image, future in zip(images, futures):
                queue.put_nowait((image, future))
            return list(await asyncio.gather(*futures))

    async def _predict_alone(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        rows: list[torch.Tensor | None] = [None] * len(images)
        for idx in _by_shape(images):
            probs = await loop.run_in_executor(self._executor, self.predict_fn, torch.stack([images[i] for i in idx]))
            self._count(len(idx))
            for j, i in enumerate(idx):
                rows[i] = probs[j]
        return rows  # type: ignore[return-value]

    def _ensure_worker(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop = loop  # first use, or a new event loop (a test client's): start a worker on it
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        return self._queue  # type: ignore[return-value]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            await self._run_batch(batch, loop)

    async def _run_batch(self, batch: list, loop: asyncio.AbstractEventLoop) -> None:
        images = [image for image, _ in batch]
        for idx in _by_shape(images):  # a model without a fixed input size: one forward per shape
            try:
                probs = await loop.run_in_executor(self._executor, self.predict_fn,
                                                   torch.stack([images[i] for i in idx]))
            except Exception as err:  # answer every waiting request with the error; the worker lives on
                for i in idx:
                    if not batch[i][1].done():
                        batch[i][1].set_exception(err)
                continue
            self._count(len(idx))
            for j, i in enumerate(idx):
                if not batch[i][1].done():  # a client that went away leaves a cancelled future
                    batch[i][1].set_result(probs[j])

    def _count(self, n: int) -> None:
        self.stats.batches += 1
        self.stats.images += n
        self.stats.largest_batch = max(self.stats.largest_batch, n)

    def close(self) -> None:
        """Stop the worker and the inference thread."""
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Admitted:
    def __init__(self, batcher: MicroBatcher, n: int) -> None:
        self.batcher, self.n = batcher, n
        batcher._pending += n

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self.batcher._pending -= self.n


def _by_shape(images: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())
