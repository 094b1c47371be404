"""Pure unit tests of the shard's store: init, lookups, updates and sync-mode aggregation (no processes).

Checkpoint files and slot staging: tests/test_shard_store_slots.py.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engram.init import init_rows
from engram.layout import table_layouts
from engram.row_optim import AdagradParams, AdamParams, lazy_adam_, rowwise_adagrad_
from proto.shard.v1 import shard_pb2
from services.shard.engine import ShardEngine
from services.shard.errors import Code, ShardError
from services.wire import pack_ids
from tests.shard_store_helpers import (
    F32,
    adam_kw,
    assert_unchanged,
    grad_bytes,
    lookup,
    lookup_f32,
    make_cfg,
    make_store,
    owned_rows,
    snapshot,
)

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------
# init and lookups


def test_init_matches_init_rows_on_any_layout():
    cfg = make_cfg()
    ((table, layout),) = table_layouts(cfg.engram).items()
    full = init_rows(
        seed=cfg.engram.seed, layer_id=table, rows=np.arange(layout.num_rows), dim=layout.dim, std=cfg.engram.init_std
    )
    for num_shards in (1, 2, 3):
        for shard in range(num_shards):
            store = make_store(cfg, shard, num_shards)
            rows = owned_rows(store, table)
            assert np.array_equal(lookup_f32(store, table, rows).numpy(), full[rows])
            assert store.view.tables[table].weights.shape == (rows.size, layout.dim)


def test_lookup_wire_dtypes_and_order():
    cfg = make_cfg()
    store = make_store(cfg)
    table = next(iter(store.layouts))
    rows = np.random.default_rng(0).permutation(owned_rows(store, table))[:700]  # > inline size, any order
    ref = torch.from_numpy(init_rows(seed=0, layer_id=table, rows=rows, dim=store.layouts[table].dim, std=1.0))
    for dtype, tdt in ((shard_pb2.BF16, torch.bfloat16), (shard_pb2.FP16, torch.float16)):
        assert torch.equal(lookup(store, table, rows, dtype=dtype), ref.to(tdt))  # one round-to-nearest
    assert lookup(store, table, rows[:0], dtype=shard_pb2.BF16).shape == (0, store.layouts[table].dim)


def test_bad_lookups_name_the_problem():
    cfg = make_cfg()
    store = make_store(cfg)
    table = next(iter(store.layouts))
    n = store.layouts[table].num_rows
    other = next(r for r in range(n) if r % store.num_slots not in store.view.owned)
    mine = int(owned_rows(store, table)[0])
    cases = [
        (dict(table=99), Code.INVALID_ARGUMENT, "table 99: no such Engram table"),
        (dict(row_ids=pack_ids(np.array([mine, n]))), Code.OUT_OF_RANGE, f"outside table {table}'s rows 0..{n - 1}"),
        (dict(row_ids=pack_ids(np.array([-1]))), Code.OUT_OF_RANGE, "first: -1 at index 0"),
        (
            dict(row_ids=pack_ids(np.array([other]))),
            Code.FAILED_PRECONDITION,
            f"row {other} is in slot {other % 16} owned by shard 1 at epoch 1",
        ),
        (dict(epoch=0), Code.FAILED_PRECONDITION, "stale slot-map epoch 0 (shard is at 1)"),
        (dict(epoch=2), Code.UNAVAILABLE, "shard at epoch 1 has not seen epoch 2 yet; retry"),
        (dict(row_ids=b"\x00" * 12), Code.INVALID_ARGUMENT, "12 bytes is not a whole number of int64 ids"),
        (dict(dtype=0), Code.INVALID_ARGUMENT, "WIRE_DTYPE_UNSPECIFIED is not a wire dtype"),
        (dict(dtype=9), Code.INVALID_ARGUMENT, "9 is not a wire dtype"),
    ]
    for over, code, text in cases:
        kw = dict(table=table, epoch=1, row_ids=pack_ids(np.array([mine])), dtype=shard_pb2.FP32) | over
        with pytest.raises(ShardError) as err:
            store.lookup(**kw)
        assert err.value.code == code and text in err.value.message, (over, err.value)


# ---------------------------------------------------------------------------------------------
# updates


def test_adam_update_equals_row_optim_and_sparse_adam():
    cfg = make_cfg("adam")
    store = make_store(cfg, 0, 1)
    table, layout = next(iter(store.layouts.items()))
    emb = torch.nn.Embedding(layout.num_rows, layout.dim, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(
            torch.from_numpy(
                init_rows(seed=0, layer_id=table, rows=np.arange(layout.num_rows), dim=layout.dim, std=1.0)
            )
        )
    kw = adam_kw()
    opt = torch.optim.SparseAdam(emb.parameters(), lr=kw["lr"], betas=(kw["beta1"], kw["beta2"]), eps=kw["eps"])
    w = emb.weight.detach().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    rng = np.random.default_rng(1)
    for step in (1, 2, 3):
        rows = rng.choice(layout.num_rows, size=300, replace=False).astype(np.int64)
        g = torch.from_numpy(rng.standard_normal((300, layout.dim)).astype(F32))
        upd = store.prepare_update(table=table, epoch=1, row_ids=pack_ids(rows), grads=grad_bytes(g), step=step, **kw)
        assert store.apply_update(upd) == 300 and store.applied_step[table] == step
        idx = torch.from_numpy(rows)
        wb, mb, vb = w[idx], m[idx], v[idx]
        lazy_adam_(wb, mb, vb, g=g, step=step, p=AdamParams(kw["lr"], kw["beta1"], kw["beta2"], kw["eps"]))
        w[idx], m[idx], v[idx] = wb, mb, vb
        opt.zero_grad()
        (emb(idx) * g).sum().backward()
        opt.step()
    data, everything = store.view.tables[table], np.arange(layout.num_rows)
    pos = torch.from_numpy(store.positions(store.view, table, everything))  # rows sit in slot order
    assert torch.equal(data.weights[pos], w) and torch.equal(data.state[0][pos], m)
    assert torch.equal(data.state[1][pos], v)
    assert torch.equal(lookup_f32(store, table, everything), emb.weight.detach())  # SparseAdam, bit for bit


def test_training_lookups_beyond_the_staleness_bound_are_refused():
    """LookupRequest.step/max_staleness: rows for step s may miss at most k applied steps."""
    cfg = make_cfg("adam")
    store = make_store(cfg, 0, 1)
    table, layout = next(iter(store.layouts.items()))
    rows = np.arange(20, dtype=np.int64)
    g = torch.ones((20, layout.dim))
    for step in (1, 2):
        store.apply_update(
            store.prepare_update(
                table=table, epoch=1, row_ids=pack_ids(rows), grads=grad_bytes(g), step=step, **adam_kw()
            )
        )
    before = snapshot(store)
    # applied step 2: step 3 misses 0 steps, step 4 misses 1, step 5 misses 2
    for step, bound in ((3, 0), (4, 1), (5, 2)):
        store.lookup(table=table, epoch=1, row_ids=pack_ids(rows), dtype=shard_pb2.FP32, step=step, max_staleness=bound)
    for step, bound, missed in ((4, 0, 1), (5, 1, 2)):
        with pytest.raises(ShardError) as err:
            store.lookup(
                table=table, epoch=1, row_ids=pack_ids(rows), dtype=shard_pb2.FP32, step=step, max_staleness=bound
            )
        assert err.value.code == Code.UNAVAILABLE
        assert f"would miss {missed} steps" in err.value.message and f"staleness bound {bound}" in err.value.message
    assert_unchanged(store, before)


def test_adagrad_update_equals_row_optim():
    cfg = make_cfg("adagrad")
    store = make_store(cfg, 1, 2)
    table, layout = next(iter(store.layouts.items()))
    rows = owned_rows(store, table)[::3]
    g = torch.randn(rows.size, layout.dim)
    w = lookup_f32(store, table, rows)
    acc = torch.zeros(rows.size)
    kw = dict(kind="adagrad", lr=float(F32(0.1)), beta1=0.0, beta2=0.0, eps=float(F32(1e-10)))
    for step in (1, 2):
        store.apply_update(
            store.prepare_update(table=table, epoch=1, row_ids=pack_ids(rows), grads=grad_bytes(g), step=step, **kw)
        )
        rowwise_adagrad_(w, acc, g, p=AdagradParams(lr=kw["lr"], eps=kw["eps"]))
    assert torch.equal(lookup_f32(store, table, rows), w)
    assert store.view.tables[table].state[0].shape == (store.view.tables[table].weights.shape[0],)


def test_bad_updates_change_nothing():
    cfg = make_cfg("adam")
    store = make_store(cfg)
    table, layout = next(iter(store.layouts.items()))
    d, n = layout.dim, layout.num_rows
    mine = owned_rows(store, table)[:4]
    other = next(r for r in range(n) if r % store.num_slots not in store.view.owned)
    g = torch.ones(4, d)
    store.apply_update(
        store.prepare_update(table=table, epoch=1, row_ids=pack_ids(mine), grads=grad_bytes(g), step=1, **adam_kw())
    )
    nan_g = g.clone()
    nan_g[1, 2], nan_g[3, 0], nan_g[3, 1] = float("nan"), float("inf"), -float("inf")
    base = dict(table=table, epoch=1, row_ids=pack_ids(mine), grads=grad_bytes(g), step=2, **adam_kw())
    cases = [
        (dict(table=7), Code.INVALID_ARGUMENT, "table 7: no such Engram table"),
        (dict(epoch=0), Code.FAILED_PRECONDITION, "stale slot-map epoch 0"),
        (dict(epoch=3), Code.UNAVAILABLE, "has not seen epoch 3"),
        (dict(step=1), Code.FAILED_PRECONDITION, "step 1 for table 1 is from the past: step 1 is already applied"),
        (dict(step=9), Code.FAILED_PRECONDITION, "step 9 for table 1 is too far ahead"),
        (dict(step=0), Code.INVALID_ARGUMENT, "step: must be >= 1"),
        (dict(grads=grad_bytes(g)[:-4]), Code.INVALID_ARGUMENT, f"expected {4 * d * 4} for 4 rows x {d} dims"),
        (dict(row_ids=pack_ids(mine)[:-3]), Code.INVALID_ARGUMENT, "not a whole number of int64 ids"),
        (
            dict(row_ids=pack_ids(np.array([mine[0], mine[1], mine[0], mine[2]]))),
            Code.INVALID_ARGUMENT,
            f"row {mine[0]} appears 2 times in the gradient of table 1",
        ),
        (
            dict(grads=grad_bytes(nan_g)),
            Code.INVALID_ARGUMENT,
            f"3 non-finite values (NaN/Inf) in 2 rows of table 1 (first: row {mine[1]})",
        ),
        (dict(row_ids=pack_ids(np.array([*mine[:3], n + 5]))), Code.OUT_OF_RANGE, "1 of 4 ids are outside"),
        (dict(row_ids=pack_ids(np.array([*mine[:3], other]))), Code.FAILED_PRECONDITION, f"row {other} is in slot"),
        (dict(kind="adagrad"), Code.FAILED_PRECONDITION, "keeps adam state; cannot apply adagrad"),
        (dict(kind="sgd"), Code.INVALID_ARGUMENT, "unknown 'sgd'"),
        (dict(lr=0.0), Code.INVALID_ARGUMENT, "optimizer.lr"),
        (dict(beta1=1.0), Code.INVALID_ARGUMENT, "optimizer.beta1"),
        (dict(eps=-1.0), Code.INVALID_ARGUMENT, "optimizer.eps"),
    ]
    before = snapshot(store)
    for over, code, text in cases:
        with pytest.raises(ShardError) as err:
            store.prepare_update(**(base | over))
        assert err.value.code == code and text in err.value.message, (over, err.value)
    store.frozen.freeze([int(mine[0] % store.num_slots)], "10.0.0.9:1")
    with pytest.raises(ShardError) as err:
        store.prepare_update(**base)
    assert err.value.code == Code.UNAVAILABLE and "being migrated to 10.0.0.9:1" in err.value.message
    assert_unchanged(store, before)


# ---------------------------------------------------------------------------------------------
# sync-mode aggregation (through the engine, on an event loop)


def test_sync_parts_sum_and_apply_once():
    cfg = make_cfg("adam")
    ref, store = make_store(cfg, 0, 1), make_store(cfg, 0, 1)
    table, layout = next(iter(store.layouts.items()))
    d = layout.dim
    rows_a, rows_b = np.array([3, 10, 11, 50], dtype=np.int64), np.array([11, 3, 99], dtype=np.int64)
    g_a, g_b = torch.randn(4, d), torch.randn(3, d)
    kw = adam_kw()
    opt = shard_pb2.OptimizerParams(kind="adam", lr=kw["lr"], beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"])

    def req(rows, g, step, *, part, num_parts=2):
        return shard_pb2.ApplyGradientsRequest(
            table=table,
            epoch=1,
            row_ids=pack_ids(rows),
            grads=grad_bytes(g),
            step=step,
            optimizer=opt,
            part_id=part,
            num_parts=num_parts,
        )

    async def body():
        with ThreadPoolExecutor(2) as pool:
            eng = ShardEngine(store, pool=pool, max_message_bytes=1 << 20, pending_wait_s=0.5)
            first = await eng.apply_gradients(req(rows_a, g_a, 1, part="w0"))
            assert first.pending and first.applied_step == 0
            with pytest.raises(ShardError, match="part 'w0' of step 1 .* already received"):
                await eng.apply_gradients(req(rows_a, g_a, 1, part="w0"))
            with pytest.raises(ShardError, match="num_parts: 3"):
                await eng.apply_gradients(req(rows_b, g_b, 1, part="w1", num_parts=3))
            with pytest.raises(ShardError, match="ABORTED|waited 0.5 s for step 1") as err:
                await eng.apply_gradients(req(rows_b, g_b, 2, part="w1"))  # step 2 waits for step 1 ... in vain
            assert err.value.code == Code.ABORTED
            later = asyncio.create_task(eng.apply_gradients(req(rows_b, g_b, 2, part="w1")))
            await asyncio.sleep(0.05)
            assert not later.done()  # waits while step 1 is pending
            done = await eng.apply_gradients(req(rows_b, g_b, 1, part="w1"))
            assert not done.pending and done.applied_step == 1 and done.rows_updated == 5
            assert (await later).pending  # step 2 went in once step 1 was applied
            with pytest.raises(ShardError, match="from the past"):
                await eng.apply_gradients(req(rows_b, g_b, 1, part="w2"))
            # a worker with no rows for this shard still sends its (empty) part
            empty = np.empty(0, dtype=np.int64)
            assert (await eng.apply_gradients(req(empty, torch.empty(0, d), 2, part="w0"))).applied_step == 2

    asyncio.run(body())
    union = np.array([3, 10, 11, 50, 99], dtype=np.int64)
    summed = torch.zeros(5, d)
    summed.index_add_(0, torch.tensor([0, 1, 2, 3]), g_a)
    summed.index_add_(0, torch.tensor([2, 0, 4]), g_b)
    ref.apply_update(
        ref.prepare_update(table=table, epoch=1, row_ids=pack_ids(union), grads=grad_bytes(summed), step=1, **kw)
    )
    ref.apply_update(
        ref.prepare_update(table=table, epoch=1, row_ids=pack_ids(rows_b), grads=grad_bytes(g_b), step=2, **kw)
    )  # step 2 = w1's part + w0's empty part
    assert torch.equal(lookup_f32(store, table, union), lookup_f32(ref, table, union))
