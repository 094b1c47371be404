"""Dynamic batching and sampling: pure pieces of the inference server."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from worker.batcher import DynamicBatcher
from worker.engine import sample_next


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_concurrent_submits_share_batches_and_get_their_own_results() -> None:
    threads: set[str] = set()

    def model(batch: list[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        return [x * 10 for x in batch]

    async def main() -> tuple[list[int], list[int]]:
        b = DynamicBatcher(model, max_batch=4, timeout_ms=50)
        b.start()
        try:
            results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        finally:
            await b.close()
        return list(results), b.batch_sizes

    results, sizes = run(main())
    assert results == [i * 10 for i in range(10)]
    assert max(sizes) == 4 and sum(sizes) == 10 and len(sizes) <= 4
    assert threads and all(name.startswith("engram-model") for name in threads)  # never on the event loop


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on() -> None:
    def model(batch: list[int]) -> list[int]:
        if -1 in batch:
            raise RuntimeError("boom")
        return batch

    async def main() -> None:
        b = DynamicBatcher(model, max_batch=8, timeout_ms=20)
        b.start()
        try:
            res = await asyncio.gather(b.submit(-1), b.submit(2), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) for r in res)
            assert await b.submit(3) == 3
        finally:
            await b.close()

    run(main())


def test_sampling_rules() -> None:
    logp = torch.log_softmax(torch.tensor([0.1, 2.0, 1.5, -1.0, 0.0]), -1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logp, temperature=0, top_k=0, top_p=1.0, generator=g) == 1
    assert {sample_next(logp, temperature=1.0, top_k=1, top_p=1.0, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logp, temperature=1.0, top_k=0, top_p=0.01, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logp, temperature=1.0, top_k=2, top_p=1.0, generator=g) for _ in range(200)} == {1, 2}
    seen = {sample_next(logp, temperature=5.0, top_k=0, top_p=1.0, generator=g) for _ in range(300)}
    assert seen == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(lambda b: b, max_batch=0, timeout_ms=1)
