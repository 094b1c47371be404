"""CUDA paths: no host sync on the hot path, remote rows equal the local table bit for bit.

Every test here needs a GPU and skips with "no CUDA device" elsewhere; `scripts/gpu_check.sh`
runs them (with `-k cuda`) whenever a GPU machine is lent.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.model import EngramLM
from services.launcher import LocalCluster
from tests.fixtures_procs import cluster_fixture
from worker.cache import HotRowCache
from worker.prefetch import LocalRowSource, LoopThread, PrefetchPipeline, RemoteRowSource
from worker.runtime import remote_source

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
pytestmark = [needs_cuda, pytest.mark.timeout(120)]
cluster = cluster_fixture(num_shards=2, overrides=[])


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Any operation that makes the host wait for the GPU raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@contextlib.contextmanager
def counted_host_syncs(out: list[int]) -> Iterator[None]:
    """Counts (does not forbid) host syncs inside the block into out[0]."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    out.append(sum("synchroniz" in str(w.message) for w in caught))


def backward_sync_budget(model: EngramLM) -> int:
    """Embedding backward on CUDA reads a segment count back (one sync per gather): per Engram
    layer the row gather, and the local table's own gather. Anything per-row or per-step on
    top (a `.cpu()`, an `.item()`) exceeds it."""
    return 2 * len(model.cfg.engram.layer_ids)


class TableClient:
    """Rows from a CPU copy of the model's tables, answered asynchronously like a shard client."""

    def __init__(self, model: EngramLM) -> None:
        self.tables = {int(k): t.weight.detach().cpu() for k, t in model.tables.items()}

    async def lookup(self, table: int, row_ids: torch.Tensor) -> torch.Tensor:
        await asyncio.sleep(0)
        return self.tables[table][row_ids]  # (U, dh) on the CPU, like a shard's reply


def cuda_model(*overrides: str) -> EngramLM:
    cfg = load_config("tiny", None, list(overrides))
    torch.manual_seed(0)
    return EngramLM(cfg, np.arange(cfg.model.vocab_size)).cuda()


def cpu_ids(model: EngramLM, seed: int, shape: tuple[int, int] = (4, 48)) -> torch.Tensor:
    return torch.randint(0, model.cfg.model.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("source_kind", ["local", "remote"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_cuda_prefetch_and_forward_never_sync_the_host(source_kind: str, with_cache: bool) -> None:
    """indices (CPU) -> issue -> land (side stream, event) -> wait -> forward, under sync debug mode "error"."""
    model = cuda_model().eval()
    loop = LoopThread() if source_kind == "remote" else None
    source = (
        RemoteRowSource(TableClient(model), loop=loop, device="cuda", owns_loop=True) if loop else LocalRowSource(model)
    )
    cache = None
    if with_cache:
        dims = {layer: lay.dim for layer, lay in model.indexer.layouts.items()}  # type: ignore[union-attr]
        cache = HotRowCache(capacity_bytes=1 << 16, dims=dims, device="cuda")
    pipe = PrefetchPipeline(model, source, cache=cache)
    try:
        with torch.inference_mode():
            ref, _ = model(cpu_ids(model, 0).cuda())  # warm-up outside the check (cuBLAS handles, allocator)
            for seed in range(3):  # the later batches hit the cache
                ids = cpu_ids(model, seed)
                with no_host_sync():
                    handle = pipe.prefetch(ids)
                    logits, _ = model(ids.pin_memory().cuda(non_blocking=True), engram_rows=handle.lazy())
                expect, _ = model(ids.cuda())
                assert torch.equal(logits, expect), "rows through the pipeline differ from the local table"
    finally:
        pipe.close()


def test_cuda_training_step_with_landed_rows_never_syncs_the_host() -> None:
    """prefetch + forward with rows landed from a (fake) shard client: the rows' grads stay on the GPU."""
    model = cuda_model().train()
    loop = LoopThread()
    pipe = PrefetchPipeline(
        model, RemoteRowSource(TableClient(model), loop=loop, device="cuda", owns_loop=True), train=True
    )
    try:
        x, y = cpu_ids(model, 1), cpu_ids(model, 2)
        _, loss = model(x.cuda(), y.cuda())  # warm-up (autograd, cuBLAS)
        loss.backward()
        model.zero_grad(set_to_none=True)
        with no_host_sync():
            handle = pipe.prefetch(x)
            x_dev, y_dev = x.pin_memory().cuda(non_blocking=True), y.pin_memory().cuda(non_blocking=True)
            _, loss = model(x_dev, y_dev, engram_rows=handle.lazy())
        syncs: list[int] = []
        with counted_host_syncs(syncs):
            loss.backward()
        print(f"host syncs in backward (remote rows): {syncs[0]}")
        assert syncs[0] <= backward_sync_budget(model), syncs
        rows = handle.wait()
        assert all(r.rows.grad is not None and r.rows.grad.is_cuda for r in rows.values())
        assert torch.isfinite(loss).item()
    finally:
        pipe.close()


def test_cuda_local_training_forward_from_cpu_ids_never_syncs_the_host() -> None:
    """The local-table model: indices from the data loader's CPU ids, bf16 autocast on."""
    model = cuda_model().train()
    x, y = cpu_ids(model, 3), cpu_ids(model, 4)
    _, loss = model(x.cuda(), y.cuda(), ids_cpu=x)
    loss.backward()
    with no_host_sync():
        logits, loss = model(x.pin_memory().cuda(non_blocking=True), y.pin_memory().cuda(non_blocking=True), ids_cpu=x)
    syncs: list[int] = []
    with counted_host_syncs(syncs):
        loss.backward()
    print(f"host syncs in backward (local tables): {syncs[0]}")
    assert syncs[0] <= backward_sync_budget(model), syncs
    assert logits.dtype == torch.bfloat16  # train.autocast=bf16 (the default) on CUDA
    assert loss.dtype == torch.float32


def test_cuda_autocast_off_keeps_fp32() -> None:
    model = cuda_model("train.autocast=off").eval()
    with torch.inference_mode():
        logits, _ = model(cpu_ids(model, 5).cuda())
    assert logits.dtype == torch.float32


@torch.no_grad()
@pytest.mark.parametrize("prefetch", [True, False])
def test_cuda_remote_fp32_logits_equal_the_local_table_bitwise(cluster: LocalCluster, prefetch: bool) -> None:
    """Real shard processes, fp32 wire, on the GPU: the same logits bit for bit as tables in HBM."""
    cfg = load_config(
        "tiny", None, [*cluster.cluster_overrides, *cluster.client_overrides("read"), "cluster.wire_dtype=fp32"]
    )  # a worker: the read identity
    model = EngramLM(cfg, np.arange(cfg.model.vocab_size)).cuda().eval()  # fresh tables == a fresh cluster
    ids = torch.randint(0, cfg.model.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
    ref, _ = model(ids.cuda(), ids_cpu=ids)
    pipe = PrefetchPipeline(model, remote_source(cfg, torch.device("cuda")), prefetch=prefetch)
    try:
        out, _ = pipe.forward(ids.cuda(), ids_cpu=ids)
        assert out.is_cuda and torch.equal(out, ref)
    finally:
        pipe.close()
