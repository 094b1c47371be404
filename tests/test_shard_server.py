"""The shard server as real processes (`python -m services.shard`) on free loopback ports."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.config import load_config
from engram.init import init_rows
from engram.layout import even_slot_map, table_layouts
from engram.row_optim import AdamParams, lazy_adam_
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.errors import Reason, error_reason
from services.wire import pack_ids, unpack_rows
from tests import fixtures_tls
from tests.fixtures_cluster import (  # noqa: F401
    ShardProcess,
    free_port,
    redis_server,
    run_shard_to_exit,
    shard_procs,
    start_all,
)

pytestmark = pytest.mark.timeout(120)
F32 = np.float32
TINY = ["--preset", "tiny", "--set", "cluster.max_message_mb=1"]
CFG = load_config("tiny", overrides=["cluster.max_message_mb=1"])
TABLE, LAYOUT = next(iter(table_layouts(CFG.engram).items()))
DIM, NROWS, NSLOTS = LAYOUT.dim, LAYOUT.num_rows, CFG.cluster.num_slots
ADAM = shard_pb2.OptimizerParams(kind="adam", lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, version=1)
ADAM_LOCAL = AdamParams(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8)  # doubles on the wire: the same values


def init_table(rows) -> torch.Tensor:
    return torch.from_numpy(init_rows(seed=0, layer_id=TABLE, rows=np.asarray(rows), dim=DIM, std=1.0))


def rows_of(owners: list[int], shard: int) -> np.ndarray:
    rows = np.arange(NROWS, dtype=np.int64)
    return rows[np.isin(rows % NSLOTS, [s for s, o in enumerate(owners) if o == shard])]


class Client:
    """A minimal synchronous client for tests (the real one is async and lives elsewhere)."""

    def __init__(self, address: str, role: str = "admin") -> None:
        opts = [("grpc.max_receive_message_length", 16 << 20)]
        self.channel = fixtures_tls.channel(address, role, opts)  # the shards serve mTLS with roles on
        self.stub = shard_pb2_grpc.MemoryShardStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def lookup(self, rows, *, epoch=1, dtype=shard_pb2.FP32, table=TABLE) -> torch.Tensor:
        resp = self.stub.Lookup(
            shard_pb2.LookupRequest(table=table, epoch=epoch, row_ids=pack_ids(np.asarray(rows)), dtype=dtype),
            timeout=10,
        )
        return unpack_rows(resp.rows, dtype, resp.dim).clone()

    def apply(self, rows, grads: torch.Tensor, *, step, epoch=1, part="", num_parts=0, table=TABLE):
        return self.stub.ApplyGradients(
            shard_pb2.ApplyGradientsRequest(
                table=table,
                epoch=epoch,
                row_ids=pack_ids(np.asarray(rows)),
                grads=grads.numpy().tobytes(),
                step=step,
                optimizer=ADAM,
                part_id=part,
                num_parts=num_parts,
            ),
            timeout=10,
        )

    def serving(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status

    def close(self) -> None:
        self.channel.close()


def expect_error(call, code: grpc.StatusCode, *texts: str, reason: Reason | None = None) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value
    if reason is not None:
        assert error_reason(err.value) == reason, (reason, err.value.details())
    for text in texts:
        assert text in err.value.details(), (text, err.value.details())
    return err.value.details()


@pytest.fixture(scope="module")
def two_shards():
    procs = [ShardProcess([*TINY, "--standalone", "--shard-id", str(i)]) for i in range(2)]
    try:
        start_all(procs)
        clients = [Client(p.address) for p in procs]
        yield procs, clients
        for c in clients:
            c.close()
    finally:
        for p in procs:
            p.kill()


def test_lookups_routed_across_two_shards_reassemble(two_shards):
    procs, clients = two_shards
    owners = even_slot_map(NSLOTS, 2)
    rows = np.random.default_rng(0).choice(NROWS, size=1500, replace=False)
    out_f32, out_bf16 = torch.empty(len(rows), DIM), torch.empty(len(rows), DIM, dtype=torch.bfloat16)
    shard_of = np.array(owners)[rows % NSLOTS]
    for shard, client in enumerate(clients):
        where = np.flatnonzero(shard_of == shard)
        out_f32[where] = client.lookup(rows[where])
        out_bf16[where] = client.lookup(rows[where], dtype=shard_pb2.BF16)
    assert torch.equal(out_f32, init_table(rows))
    assert torch.equal(out_bf16, init_table(rows).to(torch.bfloat16))
    stats = clients[0].stub.Stats(shard_pb2.StatsRequest(), timeout=5)
    assert stats.shard_id == 0 and list(stats.slots) == list(range(8)) and stats.rss_bytes > 0
    assert stats.tables[0].num_rows == rows_of(owners, 0).size and stats.lookups >= 2
    assert clients[1].serving() == health_pb2.HealthCheckResponse.SERVING


def test_lookups_in_chunks_answer_each_chunk_and_refuse_a_bad_one(two_shards):
    """A large read is several unary Lookups in flight at once (what the client does), each answered
    on its own; a bad chunk is refused with its reason and the others are still answered."""
    _, clients = two_shards
    mine = rows_of(even_slot_map(NSLOTS, 2), 1)
    chunks = [mine[i : i + 300] for i in range(0, 1200, 300)]
    reqs = [shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=pack_ids(c), dtype=shard_pb2.FP16) for c in chunks]
    bad = shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=pack_ids([NROWS]), dtype=shard_pb2.FP32)
    futures = [clients[1].stub.Lookup.future(r, timeout=10) for r in [*reqs[:2], bad, *reqs[2:]]]
    resps = [f.result() for i, f in enumerate(futures) if i != 2]
    for c, r in zip(chunks, resps, strict=True):
        assert torch.equal(unpack_rows(r.rows, shard_pb2.FP16, DIM), init_table(c).half())
    text = expect_error(futures[2].result, grpc.StatusCode.OUT_OF_RANGE, "row_ids", reason=Reason.ROW_OUT_OF_RANGE)
    assert f"{NROWS} at index 0" in text


def test_every_bad_request_is_refused_and_changes_nothing(two_shards):
    _, clients = two_shards
    c = clients[0]
    owners = even_slot_map(NSLOTS, 2)
    mine, theirs = rows_of(owners, 0)[:64], rows_of(owners, 1)[:4]
    c.apply(mine, torch.ones(64, DIM), step=1)
    before = c.lookup(mine)
    g, s = torch.ones(4, DIM), grpc.StatusCode
    nan = g.clone()
    nan[2, 1] = float("nan")
    lookup = c.stub.Lookup
    cases = [
        (lambda: c.lookup([NROWS + 3]), s.OUT_OF_RANGE, f"outside table {TABLE}'s rows"),
        (lambda: c.lookup(mine, table=5), s.INVALID_ARGUMENT, "table 5: no such Engram table"),
        (lambda: c.lookup(theirs), s.FAILED_PRECONDITION, f"row {theirs[0]} is in slot", "owned by shard 1 at epoch 1"),
        (lambda: c.lookup(mine, epoch=0), s.FAILED_PRECONDITION, "stale slot-map epoch 0 (shard is at 1)"),
        (lambda: c.lookup(mine, epoch=2), s.UNAVAILABLE, "has not seen epoch 2 yet; retry"),
        (
            lambda: lookup(shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=b"\x01" * 9, dtype=1), timeout=5),
            s.INVALID_ARGUMENT,
            "9 bytes is not a whole number of int64 ids",
        ),
        (
            lambda: lookup(shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=pack_ids(mine), dtype=7), timeout=5),
            s.INVALID_ARGUMENT,
            "dtype: 7 is not a wire dtype",
        ),
        (
            lambda: lookup(
                shard_pb2.LookupRequest(table=TABLE, epoch=1, row_ids=b"\0" * (2 << 20), dtype=1), timeout=5
            ),
            s.RESOURCE_EXHAUSTED,
        ),  # over cluster.max_message_mb=1: refused by grpc itself
        (
            lambda: c.apply(mine[:4], nan, step=2),
            s.INVALID_ARGUMENT,
            "1 non-finite values (NaN/Inf) in 1 rows of table",
        ),
        (lambda: c.apply(mine[:4], g, step=1), s.FAILED_PRECONDITION, "step 1 for table 1 is from the past"),
        (lambda: c.apply(mine[:4], g, step=1 << 63), s.FAILED_PRECONDITION, "too far ahead", "max_step_jump=1"),
        (lambda: c.apply(mine[:4], g[:3], step=2), s.INVALID_ARGUMENT, "grads:", "expected 128 for 4 rows"),
        (lambda: c.apply(mine[[0, 1, 1, 2]], g, step=2), s.INVALID_ARGUMENT, f"row {mine[1]} appears 2 times"),
        (lambda: c.apply(theirs, g, step=2), s.FAILED_PRECONDITION, "owned by shard 1"),
        (lambda: c.apply(mine[:4], g, step=2, epoch=7), s.UNAVAILABLE, "not seen epoch 7"),
        (lambda: c.apply(np.array([-4, *mine[:3]]), g, step=2), s.OUT_OF_RANGE, "first: -4 at index 0"),
    ]
    for call, code, *texts in cases:
        expect_error(call, code, *texts)
        assert c.serving() == health_pb2.HealthCheckResponse.SERVING
    assert torch.equal(c.lookup(mine), before)
    assert c.stub.Stats(shard_pb2.StatsRequest(), timeout=5).tables[0].applied_step == 1


def test_apply_gradients_over_the_wire_equals_local_optimizer(two_shards):
    _, clients = two_shards
    owners = even_slot_map(NSLOTS, 2)
    rng = np.random.default_rng(3)
    rows = rng.choice(np.concatenate([rows_of(owners, 1)]), size=200, replace=False)
    w, m, v = init_table(rows), torch.zeros(200, DIM), torch.zeros(200, DIM)
    for step in (1, 2, 3):
        g = torch.from_numpy(rng.standard_normal((200, DIM)).astype(F32))
        half = g.clone()
        half[:100] *= 0.5  # sync mode: two parts whose sum is g on the first 100 rows
        p0 = clients[1].apply(rows, half, step=step, part="w0", num_parts=2)
        p1 = clients[1].apply(rows[:100], half[:100], step=step, part="w1", num_parts=2)
        assert p0.pending and not p1.pending and p1.applied_step == step and p1.rows_updated == 200
        lazy_adam_(w, m, v, g=g, step=step, p=ADAM_LOCAL)
    assert torch.equal(clients[1].lookup(rows), w)  # bit-identical to the local optimizer


def test_sigterm_exits_zero_within_grace(shard_procs):  # noqa: F811
    p = ShardProcess([*TINY, "--standalone", "--shard-id", "1", "--grace-s", "2"])
    shard_procs.append(p.start())
    c = Client(p.address)
    assert c.serving() == health_pb2.HealthCheckResponse.SERVING
    c.close()
    t0 = time.monotonic()
    assert p.terminate(timeout_s=10) == 0
    assert time.monotonic() - t0 < 2 + 3
    assert "shutting down" in p.stderr()


def test_bad_configuration_exits_2():
    r = run_shard_to_exit(["--preset", "nope", "--standalone"])
    assert r.returncode == 2 and "unknown preset 'nope'" in r.stderr and r.stdout == ""
    r = run_shard_to_exit([*TINY, "--standalone", "--shard-id", "5"])
    assert r.returncode == 2 and "--shard-id 5 is outside 0..1" in r.stderr
    url = f"redis://127.0.0.1:{free_port()}/0"
    r = run_shard_to_exit([*TINY, "--set", f"cluster.redis_url={url}"])
    assert r.returncode == 2 and f"control plane at {url} is unreachable while reading the layout" in r.stderr


# ---------------------------------------------------------------------------------------------
# with the control plane


def redis_args(redis, namespace: str, shard: int) -> list[str]:
    return [
        *TINY,
        *[a for o in redis.overrides for a in ("--set", o)],  # its URL, password and cluster key
        "--set",
        f"cluster.namespace={namespace}",
        "--shard-id",
        str(shard),
    ]


async def _init(redis, namespace: str, num_shards: int, *, manifest: dict | None = None, **over) -> None:
    cfg = load_config("tiny", overrides=[f"cluster.{k}={v}" for k, v in over.items()])
    cp = redis.control(namespace)
    try:
        await cp.init_cluster(cfg, num_shards=num_shards)
        if manifest is not None:
            await cp.put_manifest(manifest)
    finally:
        await cp.close()
