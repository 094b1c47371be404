"""Shard processes with the control plane: checkpoint on two shards restored onto three,
heartbeats through a Redis outage, MigrateSlots while lookups go on (real Redis, real shards)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from engram.layout import even_slot_map
from engram.row_optim import lazy_adam_
from proto.shard.v1 import shard_pb2
from tests.fixtures_cluster import (  # noqa: F401
    ShardProcess,
    free_port,
    redis_server,
    run_shard_to_exit,
    shard_procs,
    start_all,
)
from tests.test_shard_server import (
    ADAM_LOCAL,
    DIM,
    F32,
    NROWS,
    NSLOTS,
    Client,
    _init,
    expect_error,
    init_table,
    redis_args,
    rows_of,
)

pytestmark = pytest.mark.timeout(120)


async def _shards(redis, namespace: str):
    cp = redis.control(namespace, timeout_s=0.5, retries=0)
    try:
        return await cp.shards()
    finally:
        await cp.close()


def test_checkpoint_on_two_shards_restores_onto_three(redis_server, shard_procs, tmp_path):  # noqa: F811
    asyncio.run(_init(redis_server, "two", 2, max_message_mb=1))
    root = ["--set", f"cluster.checkpoint_dir={tmp_path}"]  # every shard's checkpoint root (requests name checkpoints)
    two = start_all([ShardProcess([*redis_args(redis_server, "two", i), *root]) for i in range(2)])
    shard_procs.extend(two)
    owners2 = even_slot_map(NSLOTS, 2)
    clients = [Client(p.address) for p in two]
    rng = np.random.default_rng(5)
    for shard, c in enumerate(clients):
        rows = rows_of(owners2, shard)[::2]
        for step in (1, 2):
            c.apply(rows, torch.from_numpy(rng.standard_normal((rows.size, DIM)).astype(F32)), step=step)
    files = []
    for c in clients:
        files += c.stub.Checkpoint(shard_pb2.CheckpointRequest(name="ck", step=2), timeout=30).files
    assert sorted(f.slot for f in files) == list(range(NSLOTS))
    everything = np.arange(NROWS)
    expected = torch.empty(NROWS, DIM)
    for shard, c in enumerate(clients):
        where = rows_of(owners2, shard)
        expected[where] = c.lookup(where)
    manifest = {
        "step": 2,
        "name": "ck",
        "files": [
            {k: getattr(f, k) for k in ("table", "slot", "path", "sha256", "num_rows", "num_bytes")} for f in files
        ],
    }

    asyncio.run(_init(redis_server, "three", 3, manifest=manifest, max_message_mb=1))
    three = start_all([ShardProcess([*redis_args(redis_server, "three", i), *root]) for i in range(3)])
    shard_procs.extend(three)
    owners3 = even_slot_map(NSLOTS, 3)
    got = torch.empty(NROWS, DIM)
    for shard, p in enumerate(three):
        c = Client(p.address)
        got[rows_of(owners3, shard)] = c.lookup(rows_of(owners3, shard))
        assert c.stub.Stats(shard_pb2.StatsRequest(), timeout=5).tables[0].applied_step == 2
        again = c.stub.Checkpoint(shard_pb2.CheckpointRequest(name="ck3", step=2), timeout=30)
        by_slot = {f.slot: f.sha256 for f in files}
        assert all(by_slot[f.slot] == f.sha256 for f in again.files)  # identical rows and optimizer state
    assert torch.equal(got, expected) and not torch.equal(got, init_table(everything))
    assert {s.shard_id for s in asyncio.run(_shards(redis_server, "three")) if s.alive} == {0, 1, 2}

    # SetSlotMap without `owners`: the shard reads them from the control plane for its messages
    async def bump() -> None:
        cp = redis_server.control("three")
        await cp.set_slot_map(owners3, expected_epoch=1)
        await cp.close()

    asyncio.run(bump())
    c2 = Client(three[2].address)
    c2.stub.SetSlotMap(
        shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=[s for s, o in enumerate(owners3) if o == 2]), timeout=10
    )
    foreign = rows_of(owners3, 1)[:1]
    expect_error(
        lambda: c2.lookup(foreign, epoch=2),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"row {foreign[0]} is in slot {foreign[0] % NSLOTS} owned by shard 1 at epoch 2",
    )

    # a corrupt or truncated file: Restore refuses with the file's name, the live table is unchanged
    c = Client(three[0].address)
    mine = [f for f in files if owners3[f.slot] == 0]
    before = c.lookup(rows_of(owners3, 0))
    path = tmp_path / "ck" / mine[-1].path
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    req = shard_pb2.RestoreRequest(name="ck", files=files)
    expect_error(lambda: c.stub.Restore(req, timeout=30), grpc.StatusCode.DATA_LOSS, mine[-1].path, "truncated")
    damaged = bytearray(raw)
    damaged[-5] ^= 0x40
    path.write_bytes(bytes(damaged))
    expect_error(lambda: c.stub.Restore(req, timeout=30), grpc.StatusCode.DATA_LOSS, mine[-1].path, "sha256 mismatch")
    assert torch.equal(c.lookup(rows_of(owners3, 0)), before)
    assert c.serving() == health_pb2.HealthCheckResponse.SERVING
    # ... and a shard booting from that manifest refuses to start
    three[0].kill()
    r = run_shard_to_exit([*redis_args(redis_server, "three", 0), *root])
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr and mine[-1].path in r.stderr


def test_heartbeats_survive_redis_down_and_restart(redis_server, shard_procs):  # noqa: F811
    asyncio.run(_init(redis_server, "hb", 1, heartbeat_s=0.2, heartbeat_ttl_s=1.0))
    p = ShardProcess(redis_args(redis_server, "hb", 0)).start()
    shard_procs.append(p)
    assert [s.alive for s in asyncio.run(_shards(redis_server, "hb"))] == [True]
    c = Client(p.address)
    rows = np.arange(0, NROWS, 7)
    redis_server.stop()
    time.sleep(1.0)
    assert torch.equal(c.lookup(rows), init_table(rows))  # still serving without the control plane
    assert c.serving() == health_pb2.HealthCheckResponse.SERVING
    redis_server.start()  # restarted empty (no persistence): the shard registers again
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        shards = asyncio.run(_shards(redis_server, "hb"))
        if shards and shards[0].alive:
            break
        time.sleep(0.2)
    assert shards and shards[0].alive and shards[0].address == p.address
    log = p.stderr()
    assert "heartbeat failed, still serving" in log and "registered again" in log


async def _set_map(redis, namespace: str, owners: list[int], *, epoch: int) -> None:
    cp = redis.control(namespace)
    try:
        await cp.set_slot_map(owners, expected_epoch=epoch - 1)
    finally:
        await cp.close()


def test_migrate_slots_while_lookups_continue(redis_server, shard_procs):  # noqa: F811
    # MigrateSlots dials only shards the control plane registered: these two boot from it
    asyncio.run(_init(redis_server, "mig", 2, max_message_mb=1))
    procs = start_all([ShardProcess(redis_args(redis_server, "mig", i)) for i in range(2)])
    shard_procs.extend(procs)
    owners = even_slot_map(NSLOTS, 2)
    c0, c1 = Client(procs[0].address), Client(procs[1].address)
    moved = [6, 7]
    rows = rows_of(owners, 0)
    g1 = torch.ones(rows.size, DIM)
    c0.apply(rows, g1, step=1)
    expected = c0.lookup(rows)
    state = {"map": list(owners), "epoch": 1, "ok": 0, "refreshed": 0, "errors": [], "stop": False}

    def reader():  # a client that routes with its slot map and refreshes on epoch errors
        clients = [c0, c1]
        while not state["stop"]:
            owner = np.array(state["map"])[rows % NSLOTS]
            try:
                for shard in (0, 1):
                    where = np.flatnonzero(owner == shard)
                    if where.size and not torch.equal(
                        clients[shard].lookup(rows[where], epoch=state["epoch"]), expected[where]
                    ):
                        state["errors"].append("wrong rows")
                state["ok"] += 1
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE):
                    state["refreshed"] += 1
                else:
                    state["errors"].append(exc.details())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(0.3)
    resp = c0.stub.MigrateSlots(
        shard_pb2.MigrateSlotsRequest(slots=moved, target=procs[1].address, epoch=1), timeout=30
    )
    assert resp.slots_sent == 2 and resp.bytes_sent > 0
    moved_rows = rows[np.isin(rows % NSLOTS, moved)]
    expect_error(
        lambda: c0.apply(moved_rows, torch.ones(moved_rows.size, DIM), step=2),
        grpc.StatusCode.UNAVAILABLE,
        "being migrated to",
    )
    new = [1 if s in moved else o for s, o in enumerate(owners)]
    asyncio.run(_set_map(redis_server, "mig", new, epoch=2))
    for c, shard in ((c1, 1), (c0, 0)):
        c.stub.SetSlotMap(
            shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=[s for s, o in enumerate(new) if o == shard], owners=new),
            timeout=30,
        )
    state["map"], state["epoch"] = new, 2
    time.sleep(0.3)
    state["stop"] = True
    t.join(10)
    assert state["ok"] > 3 and not state["errors"], state
    where = np.isin(rows, moved_rows)
    assert torch.equal(c1.lookup(moved_rows, epoch=2), expected[torch.from_numpy(where)])
    expect_error(
        lambda: c0.lookup(moved_rows, epoch=2), grpc.StatusCode.FAILED_PRECONDITION, "owned by shard 1 at epoch 2"
    )
    expect_error(lambda: c0.lookup(rows[:3], epoch=1), grpc.StatusCode.FAILED_PRECONDITION, "stale slot-map epoch 1")
    # the optimizer state moved too: a second Adam step on the new owner matches the local history
    c1.apply(moved_rows, torch.ones(moved_rows.size, DIM), step=2, epoch=2)
    w, m, v = init_table(moved_rows), torch.zeros(moved_rows.size, DIM), torch.zeros(moved_rows.size, DIM)
    for step in (1, 2):
        lazy_adam_(w, m, v, g=torch.ones(moved_rows.size, DIM), step=step, p=ADAM_LOCAL)
    assert torch.equal(c1.lookup(moved_rows, epoch=2), w)
    stats = c0.stub.Stats(shard_pb2.StatsRequest(), timeout=5)
    assert list(stats.slots) == [0, 1, 2, 3, 4, 5] and stats.epoch == 2
    asyncio.run(_set_map(redis_server, "mig", [1 if s == 0 else 0 for s in range(NSLOTS)], epoch=3))
    expect_error(
        lambda: c1.stub.SetSlotMap(shard_pb2.SetSlotMapRequest(epoch=3, owned_slots=[0]), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        "slot 0: shard 1 has no data for it",
    )
