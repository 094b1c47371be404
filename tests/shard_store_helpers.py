"""Helpers of the shard-store unit tests (tests/test_shard_store*.py): tiny stores and lookups on them."""

from __future__ import annotations

import numpy as np
import torch

from engram.config import load_config
from engram.layout import even_slot_map
from proto.shard.v1 import shard_pb2
from services.shard.store import ShardStore
from services.wire import pack_ids, unpack_rows

F32 = np.float32


def make_cfg(optimizer: str = "adam"):
    return load_config("tiny", overrides=[f"cluster.optimizer={optimizer}"])


def make_store(cfg, shard_id: int = 0, num_shards: int = 2) -> ShardStore:
    owners = even_slot_map(cfg.cluster.num_slots, num_shards)
    return ShardStore.from_slot_map(cfg, shard_id=shard_id, owners=owners, epoch=1, init_threads=2)


def owned_rows(store: ShardStore, table: int) -> np.ndarray:
    n = store.layouts[table].num_rows
    rows = np.arange(n, dtype=np.int64)
    return rows[np.isin(rows % store.num_slots, store.view.owned)]


def snapshot(store: ShardStore) -> list[torch.Tensor]:
    return [x.clone() for d in store.view.tables.values() for x in (d.weights, *d.state)] + [
        torch.tensor(list(store.applied_step.values()))
    ]


def assert_unchanged(store: ShardStore, before: list[torch.Tensor]) -> None:
    for a, b in zip(before, snapshot(store), strict=True):
        assert torch.equal(a, b)


def adam_kw(**over):
    kw = dict(kind="adam", lr=float(F32(0.05)), beta1=float(F32(0.9)), beta2=float(F32(0.999)), eps=float(F32(1e-8)))
    return {**kw, **over}


def grad_bytes(g: torch.Tensor) -> bytes:
    return g.contiguous().numpy().astype("<f4").tobytes()


def lookup(store: ShardStore, table: int, rows: np.ndarray, *, dtype=shard_pb2.FP32, epoch=1) -> torch.Tensor:
    result = store.lookup(table=table, epoch=epoch, row_ids=pack_ids(rows), dtype=dtype)
    resp = shard_pb2.LookupResponse.FromString(result.payload)  # the hand-built reply parses as protobuf
    assert (resp.dtype, resp.epoch, resp.applied_step) == (dtype, epoch, store.applied_step[table])
    assert result.rows == len(rows) and len(resp.rows) == result.rows_nbytes
    return unpack_rows(resp.rows, dtype, resp.dim).clone()


def lookup_f32(store: ShardStore, table: int, rows: np.ndarray) -> torch.Tensor:
    return lookup(store, table, rows)
