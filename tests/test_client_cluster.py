"""ShardClient against a real 2-shard cluster (real Redis, real shard processes).

Rows below READ_ONLY_ROWS are never updated here, so every lookup of them must equal
engram.init.init_rows; the gradient and checkpoint tests use the rows above.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import grpc
import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.row_optim import AdamParams, lazy_adam_
from services.client import ShardClient, ShardError
from services.launcher import LocalCluster, ShardProcess, free_port
from tests import fixtures_tls
from tests.fixtures_procs import cluster_fixture, expected_rows, run

READ_ONLY_ROWS = 150_000
cluster = cluster_fixture(
    num_shards=2, overrides=["cluster.max_message_mb=1", "engram.table_size_per_ngram=[50021,50021]"]
)
pytestmark = pytest.mark.timeout(90)


async def connect(c: LocalCluster, **kw) -> ShardClient:
    """A client with the CLI's identity (admin: these tests checkpoint and restore too)."""
    return await ShardClient.connect(c.control(), security=c.security("admin"), **kw)


async def closing(client: ShardClient) -> None:
    await client.close()
    await client.control.close()


def test_lookup_dedups_routes_and_reassembles(cluster: LocalCluster) -> None:
    async def main() -> None:
        client = await connect(cluster)
        try:
            rng = np.random.default_rng(1)
            ids = rng.integers(0, 3000, size=(3, 50, 4))  # many duplicates, both shards
            handle = client.lookup(1, ids)
            rows = await handle
            assert rows.shape == (3, 50, 4, 8) and rows.dtype == torch.bfloat16
            assert torch.equal(rows, expected_rows(client.cfg, 1, ids))
            assert handle.has_duplicates and handle.unique_ids.size == np.unique(ids).size
            uniq = await handle.unique_rows()
            assert torch.equal(uniq[torch.from_numpy(handle.inverse)].view(3, 50, 4, 8), rows)
            as_sent = await client.lookup(1, ids, dedup_ids=False)  # duplicates sent as they are: same rows
            assert torch.equal(as_sent, rows)
            fp32 = await client.lookup(1, torch.from_numpy(ids), upcast=True)
            assert fp32.dtype == torch.float32 and torch.equal(fp32, rows.float())
        finally:
            await closing(client)

    run(main())


def test_fp32_wire_is_exact(cluster: LocalCluster) -> None:
    async def main() -> None:
        client = await connect(cluster, wire_dtype="fp32")
        try:
            ids = np.arange(0, 5000, 7)
            rows = await client.lookup(1, ids)
            assert rows.dtype == torch.float32
            assert torch.equal(rows, expected_rows(client.cfg, 1, ids, dtype=torch.float32))
        finally:
            await closing(client)

    run(main())


def test_concurrent_lookups_and_a_handle_awaited_later(cluster: LocalCluster) -> None:
    async def main() -> None:
        client = await connect(cluster)
        try:
            rng = np.random.default_rng(2)
            early = rng.integers(0, READ_ONLY_ROWS, size=(64, 16))
            handle = client.lookup(1, early)  # issued now, awaited at the end
            batches = [rng.integers(0, READ_ONLY_ROWS, size=(int(rng.integers(1, 4000)),)) for _ in range(24)]
            results = await asyncio.gather(*(client.lookup(1, b) for b in batches))
            for b, r in zip(batches, results, strict=True):
                assert torch.equal(r, expected_rows(client.cfg, 1, b))
            for _ in range(500):  # never awaited so far: it completes in the background
                if handle.done():
                    break
                await asyncio.sleep(0.01)
            assert handle.done(), "the early lookup did not complete in the background"
            assert torch.equal(await handle, expected_rows(client.cfg, 1, early))
        finally:
            await closing(client)

    run(main())


def test_request_over_the_message_limit_is_chunked(cluster: LocalCluster) -> None:
    async def main() -> None:
        client = await connect(cluster, row_path="grpc")  # the gRPC Lookup's chunking (other paths: test_row_paths)
        try:
            ids = np.random.default_rng(3).permutation(READ_ONLY_ROWS)  # 1.2 MB of ids, 2.4 MB of rows
            before = await client.stats()
            rows = await client.lookup(1, ids)
            after = await client.stats()
            assert torch.equal(rows, expected_rows(client.cfg, 1, ids))
            calls = sum(after[s].lookups - before[s].lookups for s in after)
            assert calls >= 4, f"{calls} Lookup calls for 150K rows under a 1 MB limit"
            client._chunk_rows = lambda dim: 10**9  # the same request unchunked: the shard refuses it
            with pytest.raises(ShardError) as info:
                await client.lookup(1, ids)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await closing(client)

    run(main())


@pytest.mark.parametrize("row_path", ["tcp", "grpc"])  # shm keeps reading a stopped shard's memory
def test_stopped_shard_gives_a_clear_deadline_error_and_others_answer(cluster: LocalCluster, row_path: str) -> None:
    async def main() -> None:
        client = await connect(cluster, row_path=row_path)
        try:
            owners = np.asarray(client.owners)
            ids = np.arange(0, 2000)
            on_zero = ids[owners[ids % owners.size] == 0]
            await client.lookup(1, ids)  # channels to both shards are up
            os.kill(cluster.shards[1].pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(ShardError) as info:
                    await client.lookup(1, ids, timeout_s=1.0)
                elapsed = time.monotonic() - t0
                assert info.value.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
                assert info.value.shard_id == 1 and info.value.address == cluster.addresses[1]
                assert "shard 1 at" in str(info.value) and "Lookup" in str(info.value)
                assert elapsed < 1.8, f"the 1 s deadline took {elapsed:.2f} s"
                rows = await client.lookup(1, on_zero, timeout_s=5.0)
                assert torch.equal(rows, expected_rows(client.cfg, 1, on_zero))
            finally:
                os.kill(cluster.shards[1].pid, signal.SIGCONT)
            assert torch.equal(await client.lookup(1, ids), expected_rows(client.cfg, 1, ids))
        finally:
            await closing(client)

    run(main())


def test_unreachable_shard_is_unavailable_within_the_deadline(cluster: LocalCluster) -> None:
    async def main() -> None:
        cp = cluster.control()
        cfg, smap = await cp.config(), await cp.slot_map()
        await cp.close()
        dead = f"127.0.0.1:{free_port()}"
        client = ShardClient(
            cfg,
            epoch=smap.epoch,
            owners=smap.owners,
            addresses={0: cluster.addresses[0], 1: dead},
            security=cluster.security("read"),
        )
        try:
            t0 = time.monotonic()
            with pytest.raises(ShardError) as info:
                await client.lookup(1, np.arange(100), timeout_s=2.0)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.address == dead
            assert time.monotonic() - t0 < 2.5
        finally:
            await client.close()

    run(main())


def test_bad_input_is_refused_before_any_call(cluster: LocalCluster) -> None:
    async def main() -> None:
        client = await connect(cluster)
        try:
            n = client.layouts[1].num_rows
            with pytest.raises(ValueError, match=f"outside table 1's rows 0..{n - 1}"):
                client.lookup(1, np.array([0, n]))
            with pytest.raises(ValueError, match="no such Engram table"):
                client.lookup(7, np.array([0]))
            with pytest.raises(ValueError, match="integers"):
                client.lookup(1, np.array([0.5]))
            with pytest.raises(ValueError, match="appears more than once"):
                await client.apply_gradients(
                    1, np.array([5, 5]), torch.zeros(2, 8), step=1, optimizer={"kind": "adam", "lr": 0.1}
                )
            with pytest.raises(ValueError, match="NaN/Inf"):
                await client.apply_gradients(
                    1, np.array([5]), torch.full((1, 8), float("nan")), step=1, optimizer={"kind": "adam", "lr": 0.1}
                )
        finally:
            await closing(client)

    run(main())


def test_gradients_checkpoint_and_restore(cluster: LocalCluster, tmp_path) -> None:
    async def main() -> None:
        client = await connect(cluster, wire_dtype="fp32")
        try:
            cfg, n = client.cfg, client.layouts[1].num_rows
            ids = np.random.default_rng(4).choice(np.arange(READ_ONLY_ROWS, n), size=500, replace=False)
            grads = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
            opt = {"kind": "adam", "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "version": 1}
            result = await client.apply_gradients(1, ids, grads, step=1, optimizer=opt)
            assert result.rows_updated == 500 and result.applied_step == 1 and set(result.shards) == {0, 1}
            w = expected_rows(cfg, 1, ids, dtype=torch.float32).clone()
            m, v = torch.zeros_like(w), torch.zeros_like(w)
            lazy_adam_(w, m, v, g=grads, step=1, p=AdamParams(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8))
            torch.testing.assert_close(await client.lookup(1, ids), w, rtol=1e-6, atol=1e-6)
            # training lookups: gated on the step, and the handle tells which step the rows have seen
            handle = client.lookup(1, ids, step=2, max_staleness=0)
            assert handle.applied_step == (1 if handle.done() else None)  # a small shm read lands at issue
            torch.testing.assert_close(await handle, w, rtol=1e-6, atol=1e-6)
            assert handle.applied_step == 1
            with pytest.raises(ShardError) as info:  # step 3 needs step 2 applied: refused until the deadline
                await client.lookup(1, ids, step=3, max_staleness=0, timeout_s=0.3)
            assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert await client.applied_steps() == {1: 1} and await client.wait_applied(1) == {1: 1}
            torch.testing.assert_close((await client.pull_table(1))[torch.from_numpy(ids)], w, rtol=1e-6, atol=1e-6)
            narrow = await connect(cluster, wire_dtype="bf16")  # pulls fp32 through a sibling client: same identity
            try:
                assert torch.equal(await narrow.pull_table(1), await client.pull_table(1))
            finally:
                await closing(narrow)

            manifest = await client.checkpoint("ckpt", step=1)
            assert manifest["step"] == 1 and len(manifest["files"]) == cfg.cluster.num_slots
            assert (await client.control.latest_manifest())["step"] == 1
            await client.apply_gradients(1, ids, grads, step=2, optimizer=opt)
            assert not torch.equal(await client.lookup(1, ids), w)
            restored = await client.restore()
            assert restored == {"step": 1, "slots_restored": cfg.cluster.num_slots}
            torch.testing.assert_close(await client.lookup(1, ids), w, rtol=1e-6, atol=1e-6)
        finally:
            await closing(client)

    run(main())


def test_standalone_shards_without_a_control_plane(tmp_path) -> None:
    cfg = load_config("tiny")
    procs = [
        ShardProcess(
            i,
            [
                sys.executable,
                "-m",
                "services.shard",
                "--preset",
                "tiny",
                *fixtures_tls.sets("shard"),
                "--standalone",
                "--shard-id",
                str(i),
                "--port",
                "0",
            ],
            log_path=tmp_path / f"s{i}.log",
            env=dict(os.environ),
        )
        for i in range(cfg.cluster.num_shards)
    ]
    try:
        addresses = [p.wait_ready(60) for p in procs]

        async def main() -> None:
            client = ShardClient.standalone(cfg, addresses, security=fixtures_tls.security("read"))
            try:
                ids = np.random.default_rng(6).integers(0, client.layouts[1].num_rows, size=(10, 10))
                assert torch.equal(await client.lookup(1, ids), expected_rows(cfg, 1, ids))
            finally:
                await client.close()

        run(main())
    finally:
        for p in procs:
            p.stop()
