"""Per-slot applied steps on a shard (services/shard/ownership.py), as pure unit tests of the store.

A shard rebuilt from two sources gets their slots at different steps; the next push applies to
the slots that are behind and skips the ones that already hold the step, the table's applied
step is the oldest over its slots, and the rows equal a single-process run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.init import init_rows
from engram.row_optim import AdamParams, lazy_adam_
from proto.shard.v1 import shard_pb2
from services.shard.errors import ShardError
from services.shard.migrate import Staging, slot_chunks
from services.shard.store import ShardStore
from services.wire import pack_ids, unpack_rows

pytestmark = pytest.mark.timeout(60)
ADAM = {"kind": "adam", "lr": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
SLOTS = 16


def store_with(cfg, shard_id: int, slots: list[int]) -> ShardStore:
    return ShardStore(cfg, shard_id=shard_id, owned_slots=slots, epoch=1, init_threads=1)


def grads(n_rows: int, dim: int, step: int) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(step)
    ids = np.sort(rng.choice(n_rows, size=n_rows // 3, replace=False))
    return ids, torch.from_numpy(rng.standard_normal((ids.size, dim)).astype(np.float32))


def push(store: ShardStore, table: int, update: tuple[np.ndarray, torch.Tensor], *, step: int, epoch: int = 1) -> int:
    ids, g = update
    mine = np.isin(ids % SLOTS, store.view.owned)
    upd = store.prepare_update(
        table=table,
        epoch=epoch,
        row_ids=pack_ids(ids[mine]),
        grads=g[torch.from_numpy(mine)].numpy().tobytes(),
        step=step,
        **ADAM,
    )
    return store.apply_update(upd)


def reference(cfg, table: int, *, n_rows: int, dim: int, steps: int) -> torch.Tensor:
    w = torch.from_numpy(
        init_rows(seed=cfg.engram.seed, layer_id=table, rows=np.arange(n_rows), dim=dim, std=cfg.engram.init_std)
    )
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    p = AdamParams(lr=ADAM["lr"], beta1=ADAM["beta1"], beta2=ADAM["beta2"], eps=ADAM["eps"])
    for step in range(1, steps + 1):
        ids, g = grads(n_rows, dim, step)
        idx = torch.from_numpy(ids)
        ws, ms, vs = w.index_select(0, idx), m.index_select(0, idx), v.index_select(0, idx)
        lazy_adam_(ws, ms, vs, g=g, step=step, p=p)
        w.index_copy_(0, idx, ws)
        m.index_copy_(0, idx, ms)
        v.index_copy_(0, idx, vs)
    return w


def test_slots_from_two_sources_at_different_steps_train_on_exactly() -> None:
    cfg = load_config("tiny", None, ["cluster.optimizer=adam"])
    a, b = store_with(cfg, 0, list(range(0, 8))), store_with(cfg, 1, list(range(8, 16)))
    table, layout = next(iter(a.layouts.items()))
    n, dim = layout.num_rows, layout.dim
    for step in (1, 2):
        ids, g = grads(n, dim, step)
        push(a, table, (ids, g), step=step)
        push(b, table, (ids, g), step=step)
    ids, g = grads(n, dim, 3)
    push(b, table, (ids, g), step=3)  # b is one step ahead of a when the copies are taken
    target = store_with(cfg, 2, [])
    staging = Staging(target)
    for src, slots in ((a, [0, 1, 2]), (b, [8, 9])):
        for s in slots:
            for chunk in slot_chunks(src, table=table, slot=s, epoch=1, chunk_bytes=4096):
                staging.add(chunk)
    target.set_ownership(epoch=2, owned_slots=[0, 1, 2, 8, 9], owners=None, staged=staging.complete)
    assert [int(target.slot_steps[table][s]) for s in (0, 1, 2, 8, 9)] == [2, 2, 2, 3, 3]
    assert target.applied_step[table] == 2  # the oldest: every row served is at least that new
    rows = np.flatnonzero(np.isin(np.arange(n) % SLOTS, [0, 1, 2, 8, 9]))
    got = target.lookup(table=table, epoch=2, row_ids=pack_ids(rows), dtype=shard_pb2.FP32)
    assert shard_pb2.LookupResponse.FromString(got.payload).applied_step == 2
    # step 3 reaches the target: slots 0-2 take it, slots 8-9 (copied after it) skip it
    ids, g = grads(n, dim, 3)
    mine = np.isin(ids % SLOTS, [0, 1, 2, 8, 9])
    assert push(target, table, (ids, g), step=3, epoch=2) == int(np.isin(ids[mine] % SLOTS, [0, 1, 2]).sum())
    assert target.applied_step[table] == 3 and set(target.slot_steps[table][[0, 1, 2, 8, 9]].tolist()) == {3}
    with pytest.raises(ShardError, match="from the past"):  # every slot holds step 3 now
        push(target, table, (ids, g), step=3, epoch=2)
    ids, g = grads(n, dim, 4)
    push(target, table, (ids, g), step=4, epoch=2)
    want = reference(cfg, table, n_rows=n, dim=dim, steps=4)[torch.from_numpy(rows)]
    reply = shard_pb2.LookupResponse.FromString(
        target.lookup(table=table, epoch=2, row_ids=pack_ids(rows), dtype=shard_pb2.FP32).payload
    )
    assert torch.equal(unpack_rows(reply.rows, shard_pb2.FP32, reply.dim), want)
    # the slot steps travel with the rows: a copy of slot 8 from the target says step 4
    chunk = next(slot_chunks(target, table=table, slot=8, epoch=2, chunk_bytes=4096))
    assert chunk.applied_step == 4


def test_training_lookups_are_gated_on_the_oldest_slot() -> None:
    cfg = load_config("tiny", None, ["cluster.optimizer=adam"])
    a, b = store_with(cfg, 0, [0]), store_with(cfg, 1, [1])
    table, layout = next(iter(a.layouts.items()))
    ids, g = grads(layout.num_rows, layout.dim, 1)
    push(b, table, (ids, g), step=1)
    target = store_with(cfg, 2, [])
    staging = Staging(target)
    for src, s in ((a, 0), (b, 1)):
        for chunk in slot_chunks(src, table=table, slot=s, epoch=1, chunk_bytes=1 << 20):
            staging.add(chunk)
    target.set_ownership(epoch=2, owned_slots=[0, 1], owners=None, staged=staging.complete)
    row = np.array([1], dtype=np.int64)  # slot 1, which holds step 1; slot 0 does not
    with pytest.raises(ShardError, match="would miss 1 steps"):
        target.lookup(table=table, epoch=2, row_ids=pack_ids(row), dtype=shard_pb2.FP32, step=2, max_staleness=0)
    target.lookup(table=table, epoch=2, row_ids=pack_ids(row), dtype=shard_pb2.FP32, step=2, max_staleness=1)


def test_a_shard_that_imports_takes_no_update_and_refuses_an_older_copy() -> None:
    """A gainer that already holds slots: no update while it imports or holds staged slots (a client
    must not count it done with a step its new copies lack), and a copy older than its own steps
    is refused (the migration is retried)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from services.shard.engine import ShardEngine

    cfg = load_config("tiny", None, ["cluster.optimizer=adam"])
    src, gainer = store_with(cfg, 0, [0, 1]), store_with(cfg, 1, [2, 3])
    table, layout = next(iter(src.layouts.items()))
    ids, g = grads(layout.num_rows, layout.dim, 1)
    push(gainer, table, (ids, g), step=1)  # the gainer applied step 1; the source (frozen, say) did not
    stale = list(slot_chunks(src, table=table, slot=0, epoch=1, chunk_bytes=1 << 20))
    with pytest.raises(ShardError, match="behind step 1 .* retry the migration"):
        Staging(gainer).add(stale[0])
    push(src, table, (ids, g), step=1)
    fresh = list(slot_chunks(src, table=table, slot=0, epoch=1, chunk_bytes=1 << 20))

    def request(step: int, *, epoch: int = 1) -> shard_pb2.ApplyGradientsRequest:
        mine = np.isin(ids % SLOTS, gainer.view.owned)
        return shard_pb2.ApplyGradientsRequest(
            table=table,
            epoch=epoch,
            row_ids=pack_ids(ids[mine]),
            grads=g[torch.from_numpy(mine)].numpy().tobytes(),
            step=step,
            optimizer=shard_pb2.OptimizerParams(**ADAM),
        )

    async def body() -> None:
        with ThreadPoolExecutor(2) as pool:
            eng = ShardEngine(gainer, pool=pool, max_message_bytes=1 << 22)

            async def stream():
                for c in fresh:
                    yield c

            assert (await eng.import_slots(stream())).slots_received == 1
            with pytest.raises(ShardError, match="importing slots") as err:
                await eng.apply_gradients(request(2))
            assert err.value.code.name == "UNAVAILABLE" and gainer.applied_step[table] == 1
            await eng.set_slot_map(shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=[0, 2, 3]))
            ok = await eng.apply_gradients(request(2, epoch=2))
            assert ok.applied_step == 2 and gainer.slot_steps[table][0] == 2

    asyncio.run(body())
