"""No request can wedge a shard: each stuck state expires, each unbounded one is refused (real processes)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.layout import even_slot_map, table_layouts
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.errors import Reason
from tests.fixtures_cluster import ShardProcess, redis_server, shard_procs, start_all  # noqa: F401
from tests.test_shard_server import Client, _init, expect_error, redis_args, rows_of

pytestmark = pytest.mark.timeout(120)
LIMITS = [
    "--set",
    "cluster.pending_step_timeout_s=1",
    "--set",
    "cluster.freeze_lease_s=1",
    "--set",
    "cluster.max_message_mb=4",
    "--set",
    "cluster.inflight_mb=1",
    "--set",
    "cluster.idle_connection_s=1",
]
CFG = load_config("tiny")
TABLE, LAYOUT = next(iter(table_layouts(CFG.engram).items()))
DIM, NSLOTS = LAYOUT.dim, CFG.cluster.num_slots
OWNERS = even_slot_map(NSLOTS, 2)


@pytest.fixture(scope="module")
def pair():
    procs = [ShardProcess(["--preset", "tiny", *LIMITS, "--standalone", "--shard-id", str(i)]) for i in range(2)]
    try:
        start_all(procs)
        clients = [Client(p.address) for p in procs]
        yield procs, clients
        for c in clients:
            c.close()
    finally:
        for p in procs:
            p.kill()


def _applied(c: Client) -> int:
    return c.stub.Stats(shard_pb2.StatsRequest(), timeout=5).tables[0].applied_step


def _retry(call, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"still refused after {timeout_s} s: {exc.code()} {exc.details()}") from exc
            time.sleep(0.1)


def test_steps_and_epochs_advance_only_by_bounded_amounts(pair):
    _, clients = pair
    c = clients[0]
    mine, g = rows_of(OWNERS, 0)[:8], torch.ones(8, DIM)
    step = _applied(c) + 1
    for bad in (1 << 63, (1 << 64) - 1, step + 1):
        expect_error(lambda b=bad: c.apply(mine, g, step=b), grpc.StatusCode.FAILED_PRECONDITION, "too far ahead")
    assert c.apply(mine, g, step=step).applied_step == step  # the next step still applies
    setmap = c.stub.SetSlotMap
    expect_error(
        lambda: setmap(shard_pb2.SetSlotMapRequest(epoch=1 << 63, owned_slots=list(range(8))), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_epoch_jump",
    )
    expect_error(
        lambda: setmap(shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=[]), timeout=5),
        grpc.StatusCode.FAILED_PRECONDITION,
        "drop slots [0, 1, 2",
        "without naming their new owners",
    )
    expect_error(
        lambda: setmap(shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=[], owners=[9999] * NSLOTS), timeout=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "outside 0..15",
    )
    assert torch.equal(c.lookup(mine), c.lookup(mine, epoch=1))  # still at epoch 1, every slot served
    assert c.stub.Stats(shard_pb2.StatsRequest(), timeout=5).epoch == 1


def test_partial_multi_part_step_expires(pair):
    procs, clients = pair
    c = clients[1]
    mine = rows_of(OWNERS, 1)[:4]
    step = _applied(c) + 1
    assert c.apply(mine, torch.ones(4, DIM), step=step, part="w0", num_parts=2).pending
    ckpt = shard_pb2.CheckpointRequest(name="never-written", step=step)
    expect_error(lambda: c.stub.Checkpoint(ckpt, timeout=5), grpc.StatusCode.FAILED_PRECONDITION, "collecting parts")
    expect_error(
        lambda: c.apply(mine, torch.ones(4, DIM), step=step, part="w0", num_parts=1 << 20),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_step_parts",
    )
    time.sleep(1.5)  # pending_step_timeout_s=1: the half step is discarded, nothing of it applied
    assert _applied(c) == step - 1
    assert c.apply(mine, torch.ones(4, DIM), step=step).applied_step == step
    assert "discarded step" in procs[1].stderr()


async def _set_map(redis, namespace: str, owners: list[int]) -> None:
    cp = redis.control(namespace)
    try:
        await cp.set_slot_map(owners, expected_epoch=1)
    finally:
        await cp.close()


def test_migration_freeze_is_a_lease(redis_server, shard_procs):  # noqa: F811
    # MigrateSlots dials only shards the control plane registered: this pair boots from one
    asyncio.run(_init(redis_server, "lease", 2, pending_step_timeout_s=1, freeze_lease_s=1))
    procs = start_all([ShardProcess(redis_args(redis_server, "lease", i)) for i in range(2)])
    shard_procs.extend(procs)
    c0 = Client(procs[0].address)
    moved = rows_of(OWNERS, 0)
    moved = moved[moved % NSLOTS == 3][:4]
    c0.stub.MigrateSlots(shard_pb2.MigrateSlotsRequest(slots=[3], target=procs[1].address, epoch=1), timeout=30)
    step = _applied(c0) + 1
    expect_error(
        lambda: c0.apply(moved, torch.ones(4, DIM), step=step),
        grpc.StatusCode.UNAVAILABLE,
        "being migrated to",
        reason=Reason.SLOT_FROZEN,
    )
    # nobody sends the new slot map: the freeze lifts after freeze_lease_s=1 ...
    assert _retry(lambda: c0.apply(moved, torch.ones(4, DIM), step=step)).applied_step == step
    # ... and a map giving slot 3 away is refused: updates reached it after the copy
    new = [1 if s == 3 else o for s, o in enumerate(OWNERS)]
    owned0 = [s for s, o in enumerate(new) if o == 0]
    asyncio.run(_set_map(redis_server, "lease", new))  # even with the control plane's word for it
    expect_error(
        lambda: c0.stub.SetSlotMap(shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=owned0, owners=new), timeout=5),
        grpc.StatusCode.FAILED_PRECONDITION,
        "expired",
        "migrate it again",
    )
    assert "dropped 1 staged slot imports" in _wait_log(procs[1], "dropped 1 staged slot imports")
    c0.close()


def _wait_log(proc: ShardProcess, text: str, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in proc.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc.stderr()


def test_reply_size_and_inflight_memory_checked_before_work(pair):
    procs, clients = pair
    c = clients[0]
    mine = rows_of(OWNERS, 0)
    # 0.3 MiB of ids, fp32 rows: ~1.2 MiB reply + ids > cluster.inflight_mb=1
    ids = np.resize(mine, (300 << 10) // 8)
    req = shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=ids.tobytes(), dtype=shard_pb2.FP32)
    expect_error(lambda: c.stub.Lookup(req, timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED, "cluster.inflight_mb")
    # 3.5 MiB of ids whose reply would be 14 MiB: refused from the request, before any reply exists
    big = shard_pb2.LookupRequest(
        table=TABLE, epoch=1, row_ids=np.resize(mine, (3584 << 10) // 8).tobytes(), dtype=shard_pb2.FP32
    )
    with procs[0].channel(options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        expect_error(
            lambda: shard_pb2_grpc.MemoryShardStub(ch).Lookup(big, timeout=10),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MiB reply, over cluster.max_message_mb=4",
        )
    small = mine[:100]
    assert c.lookup(small).shape == (100, DIM)  # and the shard serves the next request


def test_malformed_bytes_get_one_line_not_a_traceback(pair):
    procs, clients = pair
    with procs[0].channel() as ch:
        for rpc in ("Lookup", "ApplyGradients", "SetSlotMap", "Stats"):
            call = ch.unary_unary(f"/engram.shard.v1.MemoryShard/{rpc}")
            expect_error(
                lambda c=call: c(b"\x0a\xff\xff\xff\xff\x0f\x01", timeout=5),
                grpc.StatusCode.INVALID_ARGUMENT,
                "are not a valid",
            )
        stream = ch.stream_unary("/engram.shard.v1.MemoryShard/ImportSlots")
        expect_error(
            lambda: stream(iter([b"\xff\xff"]), timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "not a valid SlotChunk"
        )
    log = procs[0].stderr()
    assert "Traceback" not in log and log.count("bad request: Lookup refused: INVALID_ARGUMENT") >= 1


def test_idle_connections_are_closed(pair):
    procs, clients = pair
    states: list[grpc.ChannelConnectivity] = []
    seen = threading.Event()

    def note(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        if grpc.ChannelConnectivity.READY in states and state == grpc.ChannelConnectivity.IDLE:
            seen.set()

    with procs[1].channel() as ch:
        ch.subscribe(note, try_to_connect=False)
        shard_pb2_grpc.MemoryShardStub(ch).Stats(shard_pb2.StatsRequest(), timeout=5)
        assert seen.wait(6), states  # idle_connection_s=1: the shard sent GOAWAY, the channel went idle
        assert shard_pb2_grpc.MemoryShardStub(ch).Stats(shard_pb2.StatsRequest(), timeout=5).shard_id == 1
        ch.unsubscribe(note)
