"""Shared-memory and TCP row paths vs the gRPC Lookup: 2 real shard processes + a real Redis.

Every path must return bit-identical rows (fp32, bf16 from the shard's mirror, fp16 rounded
from fp32), before and after updates, and fall back (with one warning) when shared memory is
unavailable.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from services.client import ShardClient
from services.client.row_request import LookupCall
from services.launcher import LocalCluster
from tests.fixtures_procs import expected_rows, run, secure_cluster

OVERRIDES = ["cluster.optimizer=adagrad", "engram.table_size_per_ngram=[4099,4099]"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    shm = tmp_path_factory.mktemp("shm")
    # the TCP path runs TLS; shared memory never leaves the host
    with secure_cluster(
        [*OVERRIDES, f"cluster.shm_dir={shm}"], num_shards=2, log_dir=tmp_path_factory.mktemp("logs")
    ) as c:
        c.shm = shm
        yield c
    assert not list(shm.iterdir()), "shards left table files behind after a clean stop"


async def _client(c: LocalCluster, path: str, dtype: str, **kw) -> ShardClient:
    kw.setdefault("security", c.security("read"))
    return await ShardClient.connect(c.control(), wire_dtype=dtype, row_path=path, shm_dir=str(c.shm), **kw)


async def _lookup_all(c: LocalCluster, dtype: str, ids: np.ndarray) -> dict[str, tuple[torch.Tensor, dict]]:
    out = {}
    for path in ("shm", "tcp", "grpc"):
        client = await _client(c, path, dtype)
        try:
            rows = await client.lookup(1, ids)
            big = await client.lookup(1, np.arange(client.layouts[1].num_rows))  # large: threaded gathers, chunks
            out[path] = (rows, big, dict(client.row_paths.used))
        finally:
            await client.close()
            await client.control.close()
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_paths_return_identical_rows(cluster: LocalCluster, dtype: str) -> None:
    ids = np.random.default_rng(0).integers(0, 8000, size=(3, 50))  # duplicates, both shards
    got = run(_lookup_all(cluster, dtype, ids))
    want = expected_rows(
        cluster.cfg, 1, ids, dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    )
    for path, (rows, big, used) in got.items():
        assert rows.dtype == want.dtype and torch.equal(rows.view(torch.uint8), want.view(torch.uint8)), path
        assert torch.equal(big.view(torch.uint8), got["grpc"][1].view(torch.uint8)), path
        assert used[path] >= 4 and sum(used.values()) == used[path], (path, used)  # no silent fallback


def test_paths_agree_after_updates(cluster: LocalCluster) -> None:
    async def go() -> None:
        pusher = await _client(cluster, "grpc", "fp32", security=cluster.security("train"))
        try:
            ids = np.arange(0, 4000, 3)
            grads = torch.randn(ids.size, pusher.layouts[1].dim) * 0.1
            opt = {"kind": "adagrad", "lr": 0.05, "eps": 1e-8}
            stats = await pusher.stats()
            step = max(t.applied_step for s in stats.values() for t in s.tables) + 1
            res = await pusher.apply_gradients(1, ids, grads, step=step, optimizer=opt)
            assert res.rows_updated == ids.size
            master = await pusher.lookup(1, ids)  # fp32 master rows after the update
        finally:
            await pusher.close()
            await pusher.control.close()
        assert not torch.equal(master, expected_rows(cluster.cfg, 1, ids, dtype=torch.float32))
        for dtype, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            for path in ("shm", "tcp"):
                client = await _client(cluster, path, dtype)
                try:
                    rows = await client.lookup(1, ids)
                    assert client.row_paths.used[path] == 2 == sum(client.row_paths.used.values())  # 2 shards
                finally:
                    await client.close()
                    await client.control.close()
                assert torch.equal(rows.view(torch.uint8), master.to(tdt).view(torch.uint8)), (path, dtype)

    run(go())


def test_training_lookups_carry_step_and_return_applied_step(cluster: LocalCluster) -> None:
    async def go() -> None:
        for path in ("shm", "tcp", "grpc"):
            client = await _client(cluster, path, "bf16", timeout_s=0.5)
            try:
                routing = client._routing
                shard = int(routing.owners[5 % client.cfg.cluster.num_slots])
                stats = await client.stats([shard])
                applied = stats[shard].tables[0].applied_step
                ids = np.array([5], dtype=np.int64)
                rows, got = await client._lookup_chunk(
                    LookupCall(1, client_deadline(), refreshes=0, step=applied + 1, max_staleness=0),
                    shard_id=shard,
                    ids=ids,
                    routing=routing,
                )
                assert got == applied and rows.shape == (1, client.layouts[1].dim)
                with pytest.raises(Exception) as info:  # 3 steps ahead of the updates: refused until the deadline
                    await client._lookup_chunk(
                        LookupCall(1, client_deadline(0.4), refreshes=0, step=applied + 3, max_staleness=1),
                        shard_id=shard,
                        ids=ids,
                        routing=routing,
                    )
                assert getattr(info.value, "code", None) is not None
                assert info.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), info.value
            finally:
                await client.close()
                await client.control.close()

    run(go())


def test_small_shm_lookups_are_read_at_issue_and_counted(cluster: LocalCluster) -> None:
    """A small shared-memory lookup comes back as a finished handle (no task, no loop round);
    the client counts its reads and the staleness they carried (they never reach a shard)."""

    async def go() -> None:
        client = await _client(cluster, "shm", "bf16")
        try:
            ids = np.arange(4, 3000, 9)  # both shards; rows no test updates (1 mod 3)
            handle = client.lookup(1, ids)
            assert handle.done()  # read in place inside lookup()
            rows = await handle
            assert torch.equal(rows.view(torch.uint8), expected_rows(cluster.cfg, 1, ids).view(torch.uint8))
            assert client.row_paths.used == {"shm": 2, "tcp": 0, "grpc": 0}
            applied = min((await client.applied_steps()).values())
            handle = client.lookup(1, ids, step=applied + 2, max_staleness=1)  # one step behind: allowed
            assert handle.done() and handle.applied_step == applied
            reads = client.row_paths.shm_reads
            assert reads.lookups == 4 and reads.rows == 2 * ids.size and reads.max_staleness_seen == 1, reads
        finally:
            await client.close()
            await client.control.close()

    run(go())


def test_decode_sized_shm_reads_go_row_by_row_and_equal_the_rows(cluster: LocalCluster) -> None:
    """<= 64 rows over both shards (a decode step's lookup) take the row-by-row reader
    (services/client/shm_small.py): same rows, counted once per shard read."""

    async def go() -> None:
        client = await _client(cluster, "shm", "bf16")
        try:
            ids = np.arange(4, 3000, 9)  # rows no test updates (1 mod 3)
            await client.lookup(1, ids)  # opens both files
            before = client.row_paths.used["shm"]
            small = ids[7:47]  # 40 rows, both shards
            assert len(set((small % client.cfg.cluster.num_slots).tolist())) > 1
            handle = client.lookup(1, small)
            assert handle.done()
            rows = await handle
            assert torch.equal(rows.view(torch.uint8), expected_rows(cluster.cfg, 1, small).view(torch.uint8))
            assert client.row_paths.used["shm"] - before == 2
            assert client._kept_small is not None and client._kept_small[1][2] is not None  # the row-by-row reader
        finally:
            await client.close()
            await client.control.close()

    run(go())


def test_a_shard_restarted_on_its_address_gets_its_new_row_paths() -> None:
    """Pure unit test of RowPaths.update. A LocalCluster restarts a shard on a new port (a new
    peer, covered by tests/test_failover.py); compose and k8s restart it on the same address. The
    client must then not keep the old process's token (its files look foreign, so shared memory
    stayed off for good) nor its data port."""
    from types import SimpleNamespace

    from services.client.row_paths import RowPaths

    def record(token: str, port: int) -> SimpleNamespace:
        paths = {"host_id": "h", "data_address": f"127.0.0.1:{port}", "shm_files": {"1": "t1"}, "shm_token": token}
        return SimpleNamespace(address="127.0.0.1:7000", info={"row_paths": paths})

    paths = RowPaths(host_id="h")
    paths.update([record("aa" * 16, 7001)])
    first = paths._peers["127.0.0.1:7000"]
    first.shm_off = "the file belongs to another shard process"  # what the old process's peer learnt
    paths.update([record("aa" * 16, 7001)])  # the same process, registered again: kept as it is
    assert paths._peers["127.0.0.1:7000"] is first
    paths.update([record("bb" * 16, 7002)])  # a new process on the same address
    new = paths._peers["127.0.0.1:7000"]
    assert new is not first and new.data_address == "127.0.0.1:7002" and new.token == bytes.fromhex("bb" * 16)
    assert not new.shm_off and not new.tcp_off


def test_sync_facade_reads_shared_memory_on_the_callers_thread(cluster: LocalCluster) -> None:
    from engram.config import load_config
    from services.client.sync import SyncShardClient

    cfg = load_config(
        "tiny",
        None,
        [
            *OVERRIDES,
            f"cluster.shm_dir={cluster.shm}",
            "cluster.row_path=shm",
            *cluster.cluster_overrides,
            *cluster.client_overrides("read"),
        ],
    )
    with SyncShardClient.connect(cfg) as shards:
        ids = np.arange(7, 4000, 6)  # rows no test updates (1 mod 3)
        first, _ = shards.lookup(1, ids).result(timeout=30)  # on the loop: opens the table files
        fut = shards.lookup(1, ids)
        assert fut.done()  # read on this thread
        rows, applied = fut.result()
        assert rows.dtype == torch.float32 and torch.equal(rows, first)
        assert torch.equal(rows, expected_rows(cfg, 1, ids).float())
        assert applied is not None and shards.client.row_paths.used["tcp"] == 0
        with pytest.raises(ValueError, match="outside table 1"):  # bad ids: from the future, as before
            shards.lookup(1, np.array([-1])).result(timeout=30)


def client_deadline(seconds: float = 5.0) -> float:
    import asyncio

    return asyncio.get_running_loop().time() + seconds


def test_missing_shm_dir_falls_back_to_tcp_with_one_warning(cluster: LocalCluster, caplog) -> None:
    async def go() -> dict:
        client = await ShardClient.connect(
            cluster.control(),
            wire_dtype="bf16",
            row_path="auto",
            shm_dir="/nonexistent-engram-shm",
            security=cluster.security("read"),
        )
        try:
            ids = np.arange(1, 2000, 3)  # rows the update test above did not touch
            for _ in range(3):
                rows = await client.lookup(1, ids)
            assert torch.equal(rows, expected_rows(cluster.cfg, 1, ids))
            return dict(client.row_paths.used)
        finally:
            await client.close()
            await client.control.close()

    with caplog.at_level(logging.WARNING, logger="engram.client"):
        used = run(go())
    assert used["shm"] == 0 and used["tcp"] == 6 and used["grpc"] == 0, used
    warnings = [r for r in caplog.records if "shared-memory path unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "/nonexistent-engram-shm" in warnings[0].getMessage()


def test_shard_without_shm_dir_serves_tcp(tmp_path) -> None:
    overrides = [*OVERRIDES, "cluster.shm_dir=/nonexistent-engram-shm"]
    with secure_cluster(overrides, num_shards=1, log_dir=tmp_path) as c:

        async def go() -> dict:
            client = await ShardClient.connect(c.control(), wire_dtype="fp16", security=c.security("read"))
            try:
                ids = np.arange(0, 8000, 5)
                rows = await client.lookup(1, ids)
                assert torch.equal(rows, expected_rows(c.cfg, 1, ids, dtype=torch.float16))
                return dict(client.row_paths.used)
            finally:
                await client.close()
                await client.control.close()

        used = run(go())
    assert used == {"shm": 0, "tcp": 1, "grpc": 0}
