"""10,000+ malformed, random and adversarial requests against two real shards (+ real Redis).

Afterwards every shard is serving, no traceback was logged, every table's rows and optimizer
state equal a reference (the state before, plus the updates the shards accepted, replayed
with the same optimizer), and each shard applies the next valid step. Seeded (ENGRAM_FUZZ_SEED).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.config import load_config
from engram.layout import table_layouts
from engram.row_optim import AdamParams, lazy_adam_
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from tests.fixtures_cluster import ShardProcess, free_port, redis_server, shard_procs, start_all  # noqa: F401
from tests.fuzz_corpus import SERVICE, STREAMING, Corpus, Target, valid_step

pytestmark = pytest.mark.timeout(170)
N_CASES = 10_000
SEED = int(os.environ.get("ENGRAM_FUZZ_SEED", "20261130"))
LIMITS = {
    "max_message_mb": 1,
    "pending_step_timeout_s": 1,
    "freeze_lease_s": 1,
    "migrate_timeout_s": 5,
    "inflight_mb": 64,
}
CFG = load_config("tiny", overrides=[f"cluster.{k}={v}" for k, v in LIMITS.items()])
TABLE, LAYOUT = next(iter(table_layouts(CFG.engram).items()))
NSLOTS, DIM, HEADER = CFG.cluster.num_slots, LAYOUT.dim, 48


def _send(channel: grpc.Channel, rpc: str, payload) -> tuple[grpc.StatusCode, bytes | None]:
    try:
        if rpc in STREAMING:
            return grpc.StatusCode.OK, channel.stream_unary(SERVICE + rpc)(iter(payload), timeout=15)
        return grpc.StatusCode.OK, channel.unary_unary(SERVICE + rpc)(payload, timeout=15)
    except grpc.RpcError as exc:
        return exc.code(), None


def _state(stub, root: Path, name: str) -> dict[str, torch.Tensor]:
    """The shard's table as global rows: weights, m, v (from its own checkpoint files)."""
    resp = stub.Checkpoint(shard_pb2.CheckpointRequest(name=name, step=0), timeout=30)
    directory = root / name
    out: dict[str, torch.Tensor] = {}
    for f in resp.files:
        raw = np.fromfile(directory / f.path, dtype=np.uint8)
        floats = torch.from_numpy(raw[HEADER:].view(np.float32).copy())
        n = f.num_rows
        rows = torch.from_numpy(f.slot + NSLOTS * np.arange(n, dtype=np.int64))
        for i, name in enumerate(("w", "m", "v")):
            out.setdefault(name, torch.full((LAYOUT.num_rows, DIM), float("nan")))
            out[name][rows] = floats[i * n * DIM : (i + 1) * n * DIM].view(n, DIM)
    return out


def _replay(state: dict[str, torch.Tensor], accepted: list[shard_pb2.ApplyGradientsRequest]) -> None:
    for req in sorted(accepted, key=lambda r: r.step):
        ids = torch.from_numpy(np.frombuffer(req.row_ids, dtype="<i8").copy())
        if not ids.numel():
            continue  # an empty update only advances the applied step
        g = torch.from_numpy(np.frombuffer(req.grads, dtype=np.float32).copy()).view(-1, DIM)
        o = req.optimizer
        w, m, v = (state[k][ids] for k in ("w", "m", "v"))
        lazy_adam_(w, m, v, g=g, step=req.step, p=AdamParams(lr=o.lr, beta1=o.beta1, beta2=o.beta2, eps=o.eps))
        for k, x in (("w", w), ("m", m), ("v", v)):
            state[k][ids] = x


def _applied(stub) -> int:
    return stub.Stats(shard_pb2.StatsRequest(), timeout=10).tables[0].applied_step


def test_fuzz_corpus_leaves_every_shard_serving_and_unchanged(redis_server, shard_procs, tmp_path):  # noqa: F811
    async def init() -> None:
        cp = redis_server.control("fuzz")
        await cp.init_cluster(CFG, num_shards=2)
        await cp.close()

    asyncio.run(init())
    args = [
        "--preset",
        "tiny",
        *[a for o in redis_server.overrides for a in ("--set", o)],  # URL, password, cluster key
        "--set",
        "cluster.namespace=fuzz",
        "--set",
        f"cluster.checkpoint_dir={tmp_path / 'root'}",
        "--pending-wait-s",
        "0.5",
    ]
    procs = start_all([ShardProcess([*args, "--shard-id", str(i)]) for i in range(2)])
    shard_procs.extend(procs)
    opts = [("grpc.max_receive_message_length", 4 << 20), ("grpc.max_send_message_length", 4 << 20)]
    channels = [p.channel(options=opts) for p in procs]  # as admin: every RPC reaches its handler
    stubs = [shard_pb2_grpc.MemoryShardStub(ch) for ch in channels]
    owned = [list(stubs[i].Stats(shard_pb2.StatsRequest(), timeout=10).slots) for i in range(2)]
    targets = [
        Target(
            address=procs[i].address,
            table=TABLE,
            dim=DIM,
            num_rows=LAYOUT.num_rows,
            num_slots=NSLOTS,
            owned=owned[i],
            peer=procs[1 - i].address,
            closed_port=free_port(),
            scratch=f"scratch{i}",
        )
        for i in range(2)
    ]
    before = [_state(stubs[i], tmp_path / "root", f"before{i}") for i in range(2)]

    corpus, rng = Corpus(SEED), np.random.default_rng(SEED + 1)
    applied = [0, 0]
    accepted: list[list[shard_pb2.ApplyGradientsRequest]] = [[], []]
    counts: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def run(i: int, rpc: str, payload, *, note: str) -> None:
        code, reply = _send(channels[i], rpc, payload)
        with lock:
            counts[(rpc, code.name)] = counts.get((rpc, code.name), 0) + 1
        if rpc == "ApplyGradients" and code == grpc.StatusCode.OK:
            resp = shard_pb2.ApplyGradientsResponse.FromString(reply)
            req = shard_pb2.ApplyGradientsRequest.FromString(payload)
            assert req.num_parts <= 1 or resp.pending, f"a hostile multi-part step completed: {note}"
            if not resp.pending:
                accepted[i].append(req)
                applied[i] = max(applied[i], req.step)

    t0 = time.monotonic()
    window = threading.BoundedSemaphore(16)  # cases are made when a slot frees, so they see fresh applied steps

    def submit(pool: ThreadPoolExecutor, i: int, rpc: str, *, payload: bytes, note: str) -> Future:
        window.acquire()
        fut = pool.submit(run, i, rpc, payload, note=note)
        fut.add_done_callback(lambda _: window.release())
        return fut

    with ThreadPoolExecutor(8) as pool:
        futs = []
        for k in range(N_CASES):
            i = k % 2
            if (
                k % 20 < 2
            ):  # a legal update, on both shards, every so often: the only kind of write allowed to change rows
                req = valid_step(rng, targets[i], epoch=1, step=applied[i] + 1)
                futs.append(submit(pool, i, "ApplyGradients", payload=req.SerializeToString(), note="valid"))
            c = corpus.case(targets[i], epoch=1, applied=applied[i])
            futs.append(submit(pool, i, c.rpc, payload=c.payload, note=c.note))
        for f in futs:
            f.result()
    corpus_s = time.monotonic() - t0
    print(
        f"fuzz: {sum(counts.values())} requests in {corpus_s:.1f} s; accepted updates "
        f"{[len(a) for a in accepted]}; codes {sorted(counts.items())}"
    )
    assert sum(counts.values()) >= N_CASES
    assert {rpc for rpc, _ in counts} == {
        "Lookup",
        "ApplyGradients",
        "Checkpoint",
        "Restore",
        "MigrateSlots",
        "ImportSlots",
        "SetSlotMap",
        "Stats",
    }
    assert sum(n for (_, code), n in counts.items() if code != "OK") > N_CASES // 2, counts

    # every shard serving, and no stuck state: the next valid step applies once leases ran out
    for i, ch in enumerate(channels):
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING and procs[i].proc.poll() is None
        deadline = time.monotonic() + 3 * LIMITS["pending_step_timeout_s"] + LIMITS["freeze_lease_s"] + 5
        step = _applied(stubs[i]) + 1
        assert step == applied[i] + 1, (step, applied[i])  # only the accepted updates moved applied_step
        while True:
            req = valid_step(rng, targets[i], epoch=1, step=step)
            try:
                resp = stubs[i].ApplyGradients(req, timeout=10)
                break
            except grpc.RpcError as exc:
                retry = exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.ABORTED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                )
                if not retry or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert resp.applied_step == step and not resp.pending
        accepted[i].append(req)

    # tables: exactly the state before plus the accepted updates (rows and optimizer state)
    for i in range(2):
        expected = before[i]
        _replay(expected, accepted[i])
        after = _state(stubs[i], tmp_path / "root", f"after{i}")
        for k in ("w", "m", "v"):
            assert torch.equal(after[k].isnan(), expected[k].isnan())
            assert torch.equal(after[k].nan_to_num(), expected[k].nan_to_num()), (i, k)
        assert len(accepted[i]) >= 20, f"shard {i}: too few accepted updates to test the checksum ({len(accepted[i])})"
        log = procs[i].stderr()
        assert "Traceback" not in log, log[-3000:]
        assert "bad request" in log
    for ch in channels:
        ch.close()
