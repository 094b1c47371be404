"""Pure unit tests of the shard's checkpoint files and slot-migration staging (no processes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.init import init_rows
from engram.layout import even_slot_map, slot_num_rows
from engram.row_optim import AdagradParams, rowwise_adagrad_
from proto.shard.v1 import shard_pb2
from services.shard import checkpoint as ckpt
from services.shard.errors import Code, ShardError
from services.shard.migrate import Staging, slot_chunks
from services.wire import pack_ids
from tests.shard_store_helpers import (
    adam_kw,
    grad_bytes,
    lookup,
    make_cfg,
    make_store,
    owned_rows,
    snapshot,
)

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------------------------------------
# checkpoint files and migration staging


def _metas(store, table):
    layout = store.layouts[table]
    return [
        ckpt.SlotMeta(
            table, s, store.num_slots, slot_num_rows(layout.num_rows, s, store.num_slots), layout.dim, store.kind
        )
        for s in store.view.owned
    ]


def test_checkpoint_files_roundtrip_and_detect_damage(tmp_path):
    cfg = make_cfg("adam")
    src, dst = make_store(cfg), make_store(cfg)
    table, layout = next(iter(src.layouts.items()))
    rows = owned_rows(src, table)
    src.apply_update(
        src.prepare_update(
            table=table,
            epoch=1,
            row_ids=pack_ids(rows),
            grads=grad_bytes(torch.randn(rows.size, layout.dim)),
            step=1,
            **adam_kw(),
        )
    )
    files = [ckpt.write_slot(tmp_path, m, src.slot_block(table, m.slot)) for m in _metas(src, table)]
    assert not list(tmp_path.rglob(".*tmp*"))
    for f, meta in zip(files, _metas(dst, table), strict=True):
        assert f["num_bytes"] == (tmp_path / f["path"]).stat().st_size
        assert ckpt.verify_slot(str(tmp_path), f["path"], f["sha256"], meta=meta) == 1
        ckpt.load_slot(str(tmp_path), f["path"], f["sha256"], meta=meta, dst=dst.slot_block(table, meta.slot))
    for a, b in zip(snapshot(src)[:3], snapshot(dst)[:3], strict=True):
        assert torch.equal(a, b)

    f, meta = files[0], _metas(dst, table)[0]
    path = tmp_path / f["path"]
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(ShardError, match="truncated or padded") as err:
        ckpt.verify_slot(str(tmp_path), f["path"], f["sha256"], meta=meta)
    assert err.value.code == Code.DATA_LOSS and f["path"] in err.value.message
    flipped = bytearray(raw)
    flipped[100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ShardError, match="sha256 mismatch"):
        ckpt.verify_slot(str(tmp_path), f["path"], f["sha256"], meta=meta)
    path.write_bytes(raw)
    other = _metas(dst, table)[1]  # slot 0's file where slot 1's belongs: the header says which slot it holds
    (tmp_path / ckpt.slot_path(table, other.slot)).write_bytes(raw)
    with pytest.raises(ShardError, match="does not match this cluster's layout: slot"):
        ckpt.verify_slot(str(tmp_path), ckpt.slot_path(table, other.slot), f["sha256"], meta=other)
    for rel, sha, match in [
        ("../x.bin", f["sha256"], "must be 'table"),
        ("/etc/passwd", f["sha256"], "must be 'table"),
        (f["path"], "", "sha256 must be 64 lowercase hex digits"),
        (f["path"], "AB" * 32, "sha256 must be 64 lowercase hex digits"),
    ]:
        with pytest.raises(ShardError, match=match) as err:
            ckpt.verify_slot(str(tmp_path), rel, sha, meta=meta)
        assert err.value.code == Code.INVALID_ARGUMENT
    path.unlink()
    with pytest.raises(ShardError, match="does not exist") as err:
        ckpt.verify_slot(str(tmp_path), f["path"], f["sha256"], meta=meta)
    assert err.value.code == Code.FAILED_PRECONDITION


def test_slot_chunks_stage_and_switch_ownership():
    cfg = make_cfg("adagrad")
    a, b = make_store(cfg, 0, 2), make_store(cfg, 1, 2)
    table, layout = next(iter(a.layouts.items()))
    moved = list(a.view.owned[:2])
    rows = owned_rows(a, table)
    g = torch.randn(rows.size, layout.dim)
    a.apply_update(
        a.prepare_update(
            table=table,
            epoch=1,
            row_ids=pack_ids(rows),
            grads=grad_bytes(g),
            step=1,
            kind="adagrad",
            lr=0.5,
            beta1=0,
            beta2=0,
            eps=1e-10,
        )
    )
    staging = Staging(b)
    chunks = [c for s in moved for c in slot_chunks(a, table=table, slot=s, epoch=1, chunk_bytes=1000)]
    assert len(chunks) > len(moved) and all(len(c.weights) + len(c.state) <= 1000 for c in chunks)
    with pytest.raises(ShardError, match="chunk at row 27 without a start"):
        staging.add(chunks[1])  # out of order
    done = [staging.add(c) for c in chunks]
    assert sum(done) == len(moved) and not staging.partial_keys()
    with pytest.raises(ShardError, match="no data for it"):
        b.set_ownership(epoch=2, owned_slots=[*b.view.owned, a.view.owned[2]], owners=None, staged=staging.complete)
    owners = [1 if (o == 1 or s in moved) else 0 for s, o in enumerate(even_slot_map(16, 2))]
    assert b.set_ownership(epoch=2, owned_slots=[*b.view.owned, *moved], owners=owners, staged=staging.complete) == 0
    assert a.set_ownership(epoch=2, owned_slots=list(a.view.owned[2:]), owners=owners, staged={}) == 2
    moved_rows = rows[np.isin(rows % 16, moved)]
    assert torch.equal(
        lookup(b, table, moved_rows, epoch=2),
        lookup_after(a, table, rows, g=g, wanted=moved_rows),
    )
    assert b.applied_step[table] == 0  # the oldest over its slots: its own never saw step 1 (ownership.py)
    assert all(b.slot_steps[table][s] == (1 if s in moved else 0) for s in b.view.owned)
    with pytest.raises(ShardError, match="owned by shard 1 at epoch 2"):
        a.lookup(table=table, epoch=2, row_ids=pack_ids(moved_rows[:1]), dtype=shard_pb2.FP32)
    with pytest.raises(ShardError, match="stale slot-map epoch 1"):
        a.set_ownership(epoch=1, owned_slots=[], owners=None, staged={})


def lookup_after(store, table, rows, *, g, wanted):
    """Expected rows after one adagrad step from init (recomputed independently)."""
    layout = store.layouts[table]
    w = torch.from_numpy(init_rows(seed=0, layer_id=table, rows=rows, dim=layout.dim, std=1.0))
    rowwise_adagrad_(w, torch.zeros(rows.size), g, p=AdagradParams(lr=0.5, eps=1e-10))
    return w[torch.from_numpy(np.isin(rows, wanted))]
