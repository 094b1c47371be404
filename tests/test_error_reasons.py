"""Structured errors: every refusal of a real shard process carries a `google.rpc.ErrorInfo` reason.

Each case makes a shard refuse for one reason and checks that the caller reads that reason from
the status details (`error_reason`), never from the message; the ShardClient carries it on its
`ShardError`; a transport failure has no reason; the error pickles with its reason, also across
Ray. A scan of the tree checks that no caller branches on an error's message text.
"""

from __future__ import annotations

import asyncio
import pickle
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.layout import even_slot_map, table_layouts
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.client import Reason, RetryPolicy, ShardClient, ShardError, error_reason
from services.errors import DOMAIN, rich_status
from services.wire import pack_ids
from tests import fixtures_tls
from tests.fixtures_cluster import ShardProcess, free_port, start_all

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "tiny", "--set", "cluster.max_message_mb=1", "--pending-wait-s", "0.3"]
CFG = load_config("tiny", overrides=["cluster.max_message_mb=1"])
TABLE, LAYOUT = next(iter(table_layouts(CFG.engram).items()))
DIM, NROWS, NSLOTS = LAYOUT.dim, LAYOUT.num_rows, CFG.cluster.num_slots
OWNERS = even_slot_map(NSLOTS, 2)
ADAM = shard_pb2.OptimizerParams(kind="adam", lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, version=1)


def rows_of(shard: int) -> np.ndarray:
    rows = np.arange(NROWS, dtype=np.int64)
    return rows[np.isin(rows % NSLOTS, [s for s, o in enumerate(OWNERS) if o == shard])]


def _channel(proc: ShardProcess) -> grpc.Channel:
    """A plain channel to the shard, or the fixture's own (TLS, admin role) where it has one."""
    if hasattr(proc, "channel"):
        return proc.channel("admin")
    return grpc.insecure_channel(proc.address)


@pytest.fixture(scope="module")
def pair():
    procs = [ShardProcess([*ARGS, "--standalone", "--shard-id", str(i)]) for i in range(2)]
    try:
        start_all(procs)
        channel = _channel(procs[0])
        yield procs, channel, shard_pb2_grpc.MemoryShardStub(channel)
        channel.close()
    finally:
        for p in procs:
            p.kill()


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def lookup(stub, rows, *, epoch=1, table=TABLE, step=0, max_staleness=0):
    req = shard_pb2.LookupRequest(
        table=table,
        epoch=epoch,
        row_ids=pack_ids(np.asarray(rows)),
        dtype=shard_pb2.FP32,
        step=step,
        max_staleness=max_staleness,
    )
    return stub.Lookup(req, timeout=10)


def apply(stub, rows, *, step, epoch=1, part="", num_parts=0, optimizer=ADAM):
    rows = np.asarray(rows)
    req = shard_pb2.ApplyGradientsRequest(
        table=TABLE,
        epoch=epoch,
        row_ids=pack_ids(rows),
        grads=torch.ones(rows.size, DIM).numpy().tobytes(),
        step=step,
        optimizer=optimizer,
        part_id=part,
        num_parts=num_parts,
    )
    return stub.ApplyGradients(req, timeout=10)


def test_each_refusal_carries_its_reason(pair):
    procs, channel, stub = pair
    mine, theirs = rows_of(0)[:16], rows_of(1)[:4]
    s = grpc.StatusCode
    adagrad = shard_pb2.OptimizerParams(kind="adagrad", lr=0.05, eps=1e-8, version=1)
    garbage = channel.unary_unary("/engram.shard.v1.MemoryShard/Lookup")  # bytes in, bytes out
    cases = [
        (lambda: lookup(stub, mine, table=5), s.INVALID_ARGUMENT, Reason.BAD_REQUEST),
        (lambda: garbage(b"\xff\xff\xff", timeout=10), s.INVALID_ARGUMENT, Reason.BAD_REQUEST),
        (lambda: lookup(stub, [NROWS + 3]), s.OUT_OF_RANGE, Reason.ROW_OUT_OF_RANGE),
        (lambda: lookup(stub, mine, epoch=0), s.FAILED_PRECONDITION, Reason.EPOCH_STALE),
        (lambda: lookup(stub, mine, epoch=2), s.UNAVAILABLE, Reason.EPOCH_AHEAD),
        (lambda: lookup(stub, theirs), s.FAILED_PRECONDITION, Reason.SLOT_NOT_OWNED),
        (lambda: lookup(stub, np.resize(mine, 40_000)), s.RESOURCE_EXHAUSTED, Reason.REPLY_TOO_LARGE),
        (lambda: lookup(stub, mine, step=10, max_staleness=2), s.UNAVAILABLE, Reason.STALENESS_BOUND),
        (lambda: apply(stub, mine, step=1 << 40), s.FAILED_PRECONDITION, Reason.STEP_TOO_FAR_AHEAD),
        (lambda: apply(stub, mine, step=1, optimizer=adagrad), s.FAILED_PRECONDITION, Reason.OPTIMIZER_MISMATCH),
        (
            lambda: stub.Restore(shard_pb2.RestoreRequest(name="nothing-here"), timeout=10),
            s.FAILED_PRECONDITION,
            Reason.CHECKPOINT_INVALID,
        ),
        (
            lambda: stub.MigrateSlots(
                shard_pb2.MigrateSlotsRequest(slots=[0], target=procs[1].address, epoch=1), timeout=10
            ),
            s.FAILED_PRECONDITION,
            Reason.MIGRATION_REFUSED,
        ),
        (
            lambda: stub.SetSlotMap(shard_pb2.SetSlotMapRequest(epoch=1, owned_slots=[0]), timeout=10),
            s.FAILED_PRECONDITION,
            Reason.SLOT_MAP_REFUSED,
        ),
    ]
    for call, code, reason in cases:
        err = refused(call)
        assert (err.code(), error_reason(err)) == (code, reason), (reason, err.details())

    # the steps of training, in order: applied, re-sent, half collected, too late to wait for
    assert apply(stub, mine, step=1).applied_step == 1
    err = refused(lambda: apply(stub, mine, step=1))
    assert (err.code(), error_reason(err)) == (s.FAILED_PRECONDITION, Reason.STEP_FROM_PAST)
    assert apply(stub, mine, step=2, part="w0", num_parts=2).pending
    err = refused(lambda: apply(stub, mine, step=2, part="w0", num_parts=2))
    assert (err.code(), error_reason(err)) == (s.FAILED_PRECONDITION, Reason.PART_ALREADY_RECEIVED)
    err = refused(lambda: stub.Checkpoint(shard_pb2.CheckpointRequest(name="mid-step", step=2), timeout=10))
    assert (err.code(), error_reason(err)) == (s.FAILED_PRECONDITION, Reason.COLLECTING_PARTS)
    err = refused(lambda: apply(stub, mine, step=3))  # waits --pending-wait-s 0.3 for step 2's parts
    assert (err.code(), error_reason(err)) == (s.ABORTED, Reason.PARTS_TIMEOUT)
    assert apply(stub, mine, step=2, part="w1", num_parts=2).applied_step == 2


def test_the_client_branches_on_reasons_and_keeps_them(pair):
    procs, _, _ = pair
    addresses = [p.address for p in procs]
    no_retry = RetryPolicy(max_attempts=1, max_refreshes=0)
    cfg = load_config("tiny", overrides=["cluster.max_message_mb=1", *fixtures_tls.overrides("read")])  # a worker

    async def go() -> list[ShardError]:
        errors = []
        async with ShardClient.standalone(cfg, addresses, retry=no_retry, timeout_s=5) as client:
            client.set_routing(epoch=2, owners=OWNERS)  # ahead of both shards: EPOCH_AHEAD, not retried
            with pytest.raises(ShardError) as err:
                await client.lookup(TABLE, rows_of(0)[:8])
            errors.append(err.value)
            client.set_routing(epoch=0, owners=OWNERS)  # behind: EPOCH_STALE, no control plane to refresh from
            with pytest.raises(ShardError) as err:
                await client.lookup(TABLE, rows_of(1)[:8])
            errors.append(err.value)
        dead = {0: addresses[0], 1: f"127.0.0.1:{free_port()}"}  # nothing listens: a transport failure
        async with ShardClient(cfg, epoch=1, owners=OWNERS, addresses=dead, retry=no_retry, timeout_s=5) as client:
            with pytest.raises(ShardError) as err:
                await client.lookup(TABLE, rows_of(1)[:8])
            errors.append(err.value)
        return errors

    ahead, stale, transport = asyncio.run(go())
    assert (ahead.code, ahead.reason, ahead.shard_id) == (grpc.StatusCode.UNAVAILABLE, Reason.EPOCH_AHEAD, 0)
    assert (stale.code, stale.reason, stale.shard_id) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.EPOCH_STALE, 1)
    assert transport.code == grpc.StatusCode.UNAVAILABLE and transport.reason is None  # not from a shard
    for err in (ahead, stale, transport):
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), back.code, back.reason, str(back)) == (ShardError, err.code, err.reason, str(err))


def test_reasons_are_read_from_the_status_details_not_the_text():
    """A status whose message says one thing and whose ErrorInfo says another: the ErrorInfo wins;
    another domain's ErrorInfo is no Engram reason."""
    st = rich_status(grpc.StatusCode.UNAVAILABLE, "collecting parts, from the past, being migrated", Reason.EPOCH_AHEAD)
    err = _FakeCall(st.code, st.details, st.trailing_metadata)
    assert error_reason(err) == Reason.EPOCH_AHEAD and DOMAIN == "engram"
    assert error_reason(_FakeCall(st.code, st.details, ())) is None
    other = rich_status(grpc.StatusCode.UNAVAILABLE, "x", "EPOCH_AHEAD")
    from google.rpc import error_details_pb2, status_pb2

    proto = status_pb2.Status.FromString(dict(other.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    proto.details[0].Unpack(info)
    info.domain = "someone-else"
    proto.details[0].Pack(info)
    assert error_reason(_FakeCall(st.code, "x", (("grpc-status-details-bin", proto.SerializeToString()),))) is None
    unknown = ShardError(grpc.StatusCode.UNAVAILABLE, "x", reason="A_NEWER_REASON")
    assert unknown.reason == "A_NEWER_REASON" and pickle.loads(pickle.dumps(unknown)).reason == "A_NEWER_REASON"


class _FakeCall(grpc.RpcError):
    def __init__(self, code, details, trailing) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_shard_error_crosses_ray_with_its_reason():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote
        def fail() -> None:
            err = ShardError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "step 3 is collecting parts",
                reason=Reason.COLLECTING_PARTS,
                address="127.0.0.1:1",
                shard_id=2,
                call="Restore",
            )
            err.add_note("while restoring")
            raise err

        with pytest.raises(ShardError) as info:
            ray.get(fail.remote())
        err = info.value
        assert (err.code, err.reason, err.shard_id, err.call) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.COLLECTING_PARTS,
            2,
            "Restore",
        )
        assert error_reason(err) == Reason.COLLECTING_PARTS
    finally:
        ray.shutdown()


# A caller that decides what to do from an error's words: `"..." in str(exc)`, `in err.message`,
# `in exc.details()`. Tests may check messages (they are for people); code may not branch on them.
TEXT_MATCH = re.compile(
    r"""["'][^"']*["']\s+(not\s+)?in\s+(str\(\s*(e|err|exc|error)\s*\)|\w+\.(message|details\(\)))"""
)
CODE_DIRS = ("engram", "engram_cli", "services", "worker", "trainer", "benchmarks", "scripts")


def test_no_caller_matches_error_text():
    hits = []
    for top in CODE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if TEXT_MATCH.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "branch on error_reason(exc), not the message:\n" + "\n".join(hits)
    # the scan finds what it is meant to find
    for bad in (
        'if "collecting parts" not in str(exc):',
        'return "from the past" in err.message',
        "if 'already received' in exc.details():",
    ):
        assert TEXT_MATCH.search(bad), bad
