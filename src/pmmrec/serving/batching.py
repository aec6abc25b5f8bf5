"""Micro-batching of concurrent ``POST /recommend`` requests into one matrix product.

Scoring a user against a large catalogue reads the whole ``(N, D)`` item matrix; 50 users scored together read it
once instead of 50 times, and the user encoder runs once on a ``(50, L)`` batch. Requests that arrive while a
batch is being computed wait in a queue and form the next batch, so nothing waits on a timer: under light load a
batch is one request, under heavy load batches grow by themselves. One batch is computed at a time, in a worker
thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.concurrency import run_in_threadpool

from pmmrec.inference.recommender import Recommender, RecommendResult


class RecommendBatcher:
    def __init__(self, recommender: Recommender, max_batch: int = 64):
        self.recommender, self.max_batch = recommender, max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def recommend(self, history: list[str], k: int, exclude_history: bool,
                        unknown_items: str) -> RecommendResult:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first request on this event loop: start its batch worker
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._work())
        future = loop.create_future()
        self._queue.put_nowait(((history, k, exclude_history, unknown_items), future))
        return await future

    async def _work(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                results = await run_in_threadpool(self.recommender.recommend_batch, [r for r, _ in batch])
            except Exception as e:  # a bug, not bad input: every request of the batch gets it (a 500)
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
