"""The control plane survives Redis restarts; shards boot from the newest checkpoint that verifies.

Real redis-server processes (with AOF in a folder, or without persistence) and real shards.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.layout import table_layouts
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.client import ShardClient
from services.control import ControlPlane
from tests import fixtures_tls
from tests.fixtures_cluster import RedisServer, ShardProcess, shard_procs, start_all  # noqa: F401

pytestmark = pytest.mark.timeout(150)
CFG = load_config("tiny", overrides=["cluster.heartbeat_s=0.2", "cluster.heartbeat_ttl_s=2"])
TABLE, LAYOUT = next(iter(table_layouts(CFG.engram).items()))
ADAM = shard_pb2.OptimizerParams(kind="adam", lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, version=1)


def _cp(redis: RedisServer, ns: str) -> ControlPlane:
    return redis.control(ns, timeout_s=1.0, retries=0)


async def _init(redis: RedisServer, ns: str) -> None:
    """One shard: each test restarts it, and a shard boot is the slow part on a busy CI box."""
    cp = _cp(redis, ns)
    try:
        await cp.init_cluster(CFG, num_shards=1)
    finally:
        await cp.close()


def _shards(redis: RedisServer, ns: str, ids=(0,), *extra: str) -> list[ShardProcess]:
    return [
        ShardProcess(
            [
                "--preset",
                "tiny",
                *[a for o in redis.overrides for a in ("--set", o)],  # URL, password, cluster key
                "--set",
                f"cluster.namespace={ns}",
                "--shard-id",
                str(i),
                *extra,
            ]
        )
        for i in ids
    ]


async def _lookup_all(redis: RedisServer, ns: str) -> torch.Tensor:
    """A brand-new client: reads the layout, slot map and registry, then looks up every row."""
    async with await ShardClient.connect(
        _cp(redis, ns), timeout_s=10, security=fixtures_tls.security("read")
    ) as client:
        return await client.lookup(TABLE, np.arange(LAYOUT.num_rows, dtype=np.int64))


def _wait(what: str, check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
            if got is not None and got is not False:
                return got
        except Exception as exc:  # noqa: BLE001 - retried until the deadline, then re-raised
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {exc!r}") from exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.2)


def _push(address: str, step: int, epoch: int = 1) -> None:
    """One update on every row the shard owns (so rows differ from a fresh init)."""
    with fixtures_tls.channel(address, "train") as ch:
        stub = shard_pb2_grpc.MemoryShardStub(ch)
        slots = list(stub.Stats(shard_pb2.StatsRequest(), timeout=5).slots)
        rows = np.arange(LAYOUT.num_rows, dtype=np.int64)
        rows = rows[np.isin(rows % CFG.cluster.num_slots, slots)]
        grads = np.ones((rows.size, LAYOUT.dim), dtype=np.float32)
        stub.ApplyGradients(
            shard_pb2.ApplyGradientsRequest(
                table=TABLE, epoch=epoch, row_ids=rows.tobytes(), grads=grads.tobytes(), step=step, optimizer=ADAM
            ),
            timeout=10,
        )


def test_redis_killed_and_restarted_with_aof_cluster_resumes(shard_procs, tmp_path):  # noqa: F811
    redis = RedisServer(data_dir=tmp_path / "redis").start()
    try:
        asyncio.run(_init(redis, "aof"))
        shards = start_all(_shards(redis, "aof"))
        shard_procs.extend(shards)
        _push(shards[0].address, 1)
        before = asyncio.run(_lookup_all(redis, "aof"))
        time.sleep(1.5)  # appendfsync everysec
        redis.proc.kill()  # kill -9
        redis.proc.wait(timeout=10)
        redis.start()  # same port, same folder: replays the AOF
        # no operator action: a new client connects and reads the same rows, a restarted shard boots
        after = _wait("a new client after the restart", lambda: asyncio.run(_lookup_all(redis, "aof")))
        assert torch.equal(after, before)
        shards[0].kill()
        again = start_all(_shards(redis, "aof"))  # boots from the layout and slot map the AOF kept
        shard_procs.extend(again)
        got = _wait("lookups with the shard restarted", lambda: asyncio.run(_lookup_all(redis, "aof")))
        assert got.shape == before.shape and not torch.equal(got, before)  # no checkpoint: fresh rows again
    finally:
        redis.stop()


def test_redis_restarted_empty_shards_republish_layout_and_slot_map(shard_procs, tmp_path):  # noqa: F811
    redis = RedisServer().start()  # no persistence: a restart loses everything
    try:
        asyncio.run(_init(redis, "bare"))
        shards = start_all(_shards(redis, "bare"))
        shard_procs.extend(shards)
        before = asyncio.run(_lookup_all(redis, "bare"))
        redis.stop()
        redis.start()

        async def published() -> bool:
            cp = _cp(redis, "bare")
            try:
                smap, cfg = await cp.slot_map(), await cp.config()
                alive = [s.shard_id for s in await cp.shards() if s.alive]
                return smap.epoch == 1 and cfg.engram.layer_ids == CFG.engram.layer_ids and alive == [0]
            finally:
                await cp.close()

        _wait("layout, slot map and registry re-published", lambda: asyncio.run(published()))
        assert torch.equal(asyncio.run(_lookup_all(redis, "bare")), before)
        assert any("re-published" in p.stderr() for p in shards)
        shards[0].kill()  # a shard that restarts now boots from the re-published layout
        shard_procs.extend(start_all(_shards(redis, "bare")))
        assert (
            _wait("lookups with shard 0 restarted", lambda: asyncio.run(_lookup_all(redis, "bare"))).shape
            == before.shape
        )
    finally:
        redis.stop()


def test_shard_boots_from_older_manifest_when_newest_folder_is_gone(shard_procs, tmp_path):  # noqa: F811
    redis = RedisServer().start()
    try:
        asyncio.run(_init(redis, "ck"))
        root = ("--set", f"cluster.checkpoint_dir={tmp_path}")
        shards = start_all(_shards(redis, "ck", (0,), *root))
        shard_procs.extend(shards)

        def checkpoint(step: int) -> None:
            name = f"step{step}"
            files = []
            for p in shards:
                with p.channel() as ch:
                    resp = shard_pb2_grpc.MemoryShardStub(ch).Checkpoint(
                        shard_pb2.CheckpointRequest(name=name, step=step), timeout=30
                    )
                files += [
                    {k: getattr(f, k) for k in ("table", "slot", "path", "sha256", "num_rows", "num_bytes")}
                    for f in resp.files
                ]

            async def put() -> None:
                cp = _cp(redis, "ck")
                await cp.put_manifest({"step": step, "name": name, "files": files})
                await cp.close()

            asyncio.run(put())

        for p in shards:
            _push(p.address, 1)
        checkpoint(1)
        at_step1 = asyncio.run(_lookup_all(redis, "ck"))
        for p in shards:
            _push(p.address, 2)
        checkpoint(2)
        for p in shards:
            p.kill()
        shutil.rmtree(tmp_path / "step2")  # the newest checkpoint's folder is gone
        again = start_all(_shards(redis, "ck", (0,), *root))
        shard_procs.extend(again)
        assert torch.equal(asyncio.run(_lookup_all(redis, "ck")), at_step1)
        for p in again:
            log = p.stderr()
            assert "booted from an older checkpoint, step 1" in log and "step2" in log, log[-2000:]
            with p.channel() as ch:
                stats = shard_pb2_grpc.MemoryShardStub(ch).Stats(shard_pb2.StatsRequest(), timeout=5)
            assert stats.tables[0].applied_step == 1
    finally:
        redis.stop()
