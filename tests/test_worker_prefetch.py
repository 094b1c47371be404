"""The prefetch pipeline on CPU: local and (in-process, delayed) async row sources."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.model import EngramLM
from worker.cache import HotRowCache
from worker.prefetch import LocalRowSource, LoopThread, PrefetchPipeline, RemoteRowSource, RowsUnavailable


class DelayedClient:
    """An asyncio client answering from a table copy after `delay_s` (a stand-in for the shards)."""

    def __init__(self, model: EngramLM, *, delay_s: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        self.tables = {int(k): t.weight.detach().clone() for k, t in model.tables.items()}
        self.delay_s, self.dtype = delay_s, dtype
        self.calls: list[tuple[int, float]] = []

    async def lookup(self, table: int, row_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append((table, time.perf_counter()))
        await asyncio.sleep(self.delay_s)
        return self.tables[table][row_ids].to(self.dtype)


@pytest.fixture(scope="module")
def model() -> EngramLM:
    cfg = load_config("tiny", None, ["model.n_layer=3", "engram.layer_ids=[1,2]"])
    torch.manual_seed(0)
    return EngramLM(cfg, np.arange(cfg.model.vocab_size) // 2).eval()


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


def ids(seed: int = 0, B: int = 3, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.timeout(30)
@pytest.mark.parametrize("prefetch", [True, False])
def test_local_and_remote_fp32_equal_the_model_bitwise(model, loop, prefetch) -> None:
    x = ids()
    ref, _ = model(x)
    local = PrefetchPipeline(model, LocalRowSource(model), prefetch=prefetch)
    remote = PrefetchPipeline(model, RemoteRowSource(DelayedClient(model, delay_s=0.01), loop=loop), prefetch=prefetch)
    assert torch.equal(local.forward(x)[0], ref)
    assert torch.equal(remote.forward(x)[0], ref)


@torch.no_grad()
@pytest.mark.timeout(30)
def test_bf16_rows_are_within_bf16_rounding(model, loop) -> None:
    x = ids(1)
    ref, _ = model(x)
    remote = PrefetchPipeline(model, RemoteRowSource(DelayedClient(model, dtype=torch.bfloat16), loop=loop))
    out, _ = remote.forward(x)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@torch.no_grad()
@pytest.mark.timeout(30)
def test_layers_are_issued_together_and_overlap_other_work(model, loop) -> None:
    client = DelayedClient(model, delay_s=0.3)
    pipe = PrefetchPipeline(model, RemoteRowSource(client, loop=loop))
    t0 = time.perf_counter()
    handle = pipe.prefetch(ids())
    issued = time.perf_counter() - t0
    time.sleep(0.3)  # "layers before the first Engram layer" run meanwhile
    handle.wait()
    total = time.perf_counter() - t0
    assert issued < 0.2, "prefetch must return before the rows arrive"
    assert total < 0.55, f"both layers' lookups and the other work should overlap, took {total:.2f}s"
    (l1, t1), (l2, t2) = client.calls
    assert {l1, l2} == {1, 2} and abs(t1 - t2) < 0.15

    sync = PrefetchPipeline(model, RemoteRowSource(DelayedClient(model, delay_s=0.3), loop=loop), prefetch=False)
    t0 = time.perf_counter()
    sync.forward(ids())
    assert time.perf_counter() - t0 >= 0.6, "sync mode waits for each layer's lookup at that layer"


@pytest.mark.timeout(30)
def test_a_lookup_past_the_deadline_is_rows_unavailable(model, loop) -> None:
    pipe = PrefetchPipeline(
        model, RemoteRowSource(DelayedClient(model, delay_s=5), loop=loop, timeout_s=0.2), timeout_s=0.2
    )
    t0 = time.perf_counter()
    with pytest.raises(RowsUnavailable, match=r"layer 1.*lookup_timeout_s=0.2"):
        pipe.forward(ids())
    assert time.perf_counter() - t0 < 2


@torch.no_grad()
@pytest.mark.timeout(30)
def test_the_cache_serves_repeats_without_changing_results(model, loop) -> None:
    dims = {layer: lay.dim for layer, lay in model.indexer.layouts.items()}
    cache = HotRowCache(capacity_bytes=1 << 20, dims=dims)
    client = DelayedClient(model)
    pipe = PrefetchPipeline(model, RemoteRowSource(client, loop=loop), cache=cache)
    x = ids(2)
    ref, _ = model(x)
    assert torch.equal(pipe.forward(x)[0], ref)
    first = cache.stats()
    assert first.hits == 0 and first.inserts == first.lookups
    calls = len(client.calls)
    assert torch.equal(pipe.forward(x)[0], ref)
    assert cache.stats().hits == first.lookups  # second pass: every row from the cache
    assert len(client.calls) == calls  # ... and nothing was sent
    assert cache.stats().hit_rate == pytest.approx(0.5)


@pytest.mark.timeout(30)
def test_training_rows_get_the_same_gradient_as_the_local_table(model, loop) -> None:
    x, y = ids(3), ids(4)
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    pipe = PrefetchPipeline(model, RemoteRowSource(DelayedClient(model), loop=loop), train=True)
    handle = pipe.prefetch(x)
    _, loss_remote = model(x, y, engram_rows=handle.lazy())
    torch.testing.assert_close(loss_remote, loss, rtol=0, atol=0)
    loss_remote.backward()
    for layer, (unique, _) in handle.indices.items():
        rows = handle.rows(layer).rows
        assert rows.is_leaf and rows.grad is not None
        local = model.tables[str(layer)].weight.grad.coalesce().to_dense()[unique]
        torch.testing.assert_close(rows.grad, local, rtol=1e-5, atol=1e-7)
    model.zero_grad(set_to_none=True)


@torch.no_grad()
@pytest.mark.timeout(30)
def test_a_training_cache_refetches_rows_older_than_the_staleness_bound(model, loop) -> None:
    dims = {layer: lay.dim for layer, lay in model.indexer.layouts.items()}
    cache = HotRowCache(capacity_bytes=1 << 20, dims=dims, max_staleness=0)  # sync mode
    client = DelayedClient(model)
    pipe = PrefetchPipeline(model, RemoteRowSource(client, loop=loop), cache=cache)
    x = ids(5)
    pipe.step = 1
    pipe.prefetch(x).wait()
    pipe.prefetch(x).wait()  # same step: served from the cache
    assert len(client.calls) == 2 and cache.stats().hits == cache.stats().inserts
    pipe.step = 2
    pipe.prefetch(x).wait()  # a new step: every row is too old, fetched again
    assert len(client.calls) == 4 and cache.stats().stale == cache.stats().inserts


class PerTableDelay(DelayedClient):
    """Table-specific delays; records lookups that were cancelled before they answered."""

    def __init__(self, model: EngramLM, delays: dict[int, float]) -> None:
        super().__init__(model)
        self.delays, self.cancelled = delays, []

    async def lookup(self, table: int, row_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append((table, time.perf_counter()))
        try:
            await asyncio.sleep(self.delays[table])
        except asyncio.CancelledError:
            self.cancelled.append(table)
            raise
        return self.tables[table][row_ids]


@torch.no_grad()
@pytest.mark.timeout(30)
def test_every_layer_goes_to_the_loop_in_one_hop_and_lands_on_its_own(model, loop, monkeypatch) -> None:
    hops = []
    real_submit = loop.submit
    monkeypatch.setattr(loop, "submit", lambda coro: hops.append(coro) or real_submit(coro))
    client = PerTableDelay(model, {1: 0.0, 2: 0.5})
    source = RemoteRowSource(client, loop=loop)
    rows = {1: torch.tensor([3, 7, 11]), 2: torch.tensor([5, 9])}
    futures = source.issue(rows)
    assert len(hops) == 1, "both layers' lookups must reach the loop thread in one submission"
    first = futures[1].result(timeout=5)  # layer 1's rows land while layer 2's lookup still waits
    assert not futures[2].done()
    assert torch.equal(first.rows, client.tables[1][rows[1]])
    assert torch.equal(futures[2].result(timeout=5).rows, client.tables[2][rows[2]])
    # a reader that gives up on a layer (PrefetchHandle's deadline) stops that layer's lookup
    client.delays[2] = 5.0
    futures = source.issue(rows)
    futures[1].result(timeout=5)
    assert futures[2].cancel()
    deadline = time.monotonic() + 5
    while client.cancelled != [2] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.cancelled == [2]
