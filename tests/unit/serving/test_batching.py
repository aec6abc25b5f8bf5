"""RecommendBatcher: batches of at most max_batch requests, up to `concurrency` of them computed at once."""

import asyncio
import threading

import pytest

from pmmrec.serving.batching import RecommendBatcher


class FakeRecommender:
    """Answers each request with its history; two batches must be inside recommend_batch at the same time."""

    def __init__(self, parties: int, timeout: float = 10.0):
        self.barrier = threading.Barrier(parties, timeout=timeout)
        self.sizes: list[int] = []

    def recommend_batch(self, requests):
        self.sizes.append(len(requests))
        if len(self.sizes) <= self.barrier.parties:
            self.barrier.wait()  # raises BrokenBarrierError unless the other batch is computing too
        return [history for history, *_ in requests]


def _ask(batcher, n):
    """``n`` concurrent requests through ``batcher`` (closed afterwards); their answers."""

    async def main():
        try:
            return await asyncio.gather(*(batcher.recommend([f"i{i}"], 1, True, "skip") for i in range(n)))
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_batches_are_bounded_and_computed_side_by_side():
    fake = FakeRecommender(parties=2)
    answers = _ask(RecommendBatcher(fake, max_batch=3, concurrency=2), 8)
    assert answers == [[f"i{i}"] for i in range(8)]  # each request got its own answer
    assert max(fake.sizes) <= 3 and sum(fake.sizes) == 8


def test_one_batch_at_a_time_when_concurrency_is_one():
    fake = FakeRecommender(parties=2, timeout=0.5)
    # Alone in recommend_batch, the first batch waits at the barrier until it breaks: a bug, answered as one.
    with pytest.raises(threading.BrokenBarrierError):
        _ask(RecommendBatcher(fake, max_batch=3, concurrency=1), 6)


def test_batcher_rejects_nonsense_sizes():
    with pytest.raises(ValueError):
        RecommendBatcher(FakeRecommender(1), max_batch=0)
    with pytest.raises(ValueError):
        RecommendBatcher(FakeRecommender(1), concurrency=0)
