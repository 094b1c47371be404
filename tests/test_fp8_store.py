"""Row formats in the shard's store (no processes): fp8/bf16 storage, wire formats, read-only fp8,
slot files and migration chunks in the storage format, client-side dequantisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import ConfigError, load_config
from engram.init import init_rows
from engram.layout import even_slot_map, slot_num_rows
from engram.row_format import dequantize_fp8_numpy, encode_rows, quantize_fp8
from proto.shard.v1 import shard_pb2
from services.client.dequant import wire_to_values
from services.shard import checkpoint as ckpt
from services.shard.errors import Code, ShardError
from services.shard.migrate import Staging, slot_chunks
from services.shard.store import ShardStore
from services.wire import FP8, pack_ids

pytestmark = pytest.mark.timeout(60)
FP8_LAYOUT = ["engram.n_head_per_ngram=2", "engram.n_embed_per_ngram=128", "engram.table_size_per_ngram=[211,211]"]


def make(fmt: str, shard_id: int = 0, wire: str | None = None, *, optimizer: str = "adam") -> ShardStore:
    wire = wire or {"fp8": "fp8", "bf16": "bf16"}.get(fmt, "bf16")
    cfg = load_config(
        "tiny",
        overrides=[
            *FP8_LAYOUT,
            f"engram.row_format={fmt}",
            f"cluster.wire_dtype={wire}",
            f"cluster.optimizer={optimizer}",
        ],
    )
    return ShardStore.from_slot_map(cfg, shard_id=shard_id, owners=even_slot_map(16, 2), epoch=1, init_threads=1)


def owned(store: ShardStore, table: int) -> np.ndarray:
    rows = np.arange(store.layouts[table].num_rows, dtype=np.int64)
    return rows[np.isin(rows % store.num_slots, store.view.owned)]


def raw_lookup(store: ShardStore, table: int, rows: np.ndarray, *, dtype: int) -> bytes:
    resp = shard_pb2.LookupResponse.FromString(
        store.lookup(table=table, epoch=1, row_ids=pack_ids(rows), dtype=dtype).payload
    )
    assert resp.dtype == dtype and resp.dim == store.layouts[table].dim
    return resp.rows


def init(store: ShardStore, table: int, rows: np.ndarray) -> np.ndarray:
    return init_rows(seed=0, layer_id=table, rows=rows, dim=store.layouts[table].dim, std=1.0)  # (n, D) fp32


def test_fp8_table_stores_and_serves_264_byte_rows() -> None:
    store = make("fp8")
    table = 1
    dim = store.layouts[table].dim  # 64: 64 + 2 bytes a row
    rows = np.random.default_rng(0).permutation(owned(store, table))[:300]
    assert store.view.tables[table].weights.shape == (owned(store, table).size, dim + dim // 32)
    assert store.view.tables[table].state == ()  # read-only: no optimizer state
    got = np.frombuffer(raw_lookup(store, table, rows, dtype=FP8), dtype=np.uint8).reshape(rows.size, dim + 2)
    assert np.array_equal(got, encode_rows(init(store, table, rows), "fp8"))  # the stored bytes, in request order
    values = wire_to_values(torch.from_numpy(got.copy()), dim=dim, fp8=True)  # client side: bf16
    assert values.dtype == torch.bfloat16
    assert torch.equal(values.float(), torch.from_numpy(dequantize_fp8_numpy(got[:, :dim], got[:, dim:])))


def test_wider_wire_formats_are_refused_with_the_storage_format() -> None:
    store = make("fp8")
    rows = owned(store, 1)[:3]
    for dtype, name in ((shard_pb2.BF16, "BF16"), (shard_pb2.FP32, "FP32"), (shard_pb2.FP16, "FP16")):
        with pytest.raises(ShardError) as err:
            raw_lookup(store, 1, rows, dtype=dtype)
        assert err.value.code == Code.INVALID_ARGUMENT
        assert f"{name} (" in err.value.message and "storage format fp8" in err.value.message
    bf16 = make("bf16")
    with pytest.raises(ShardError, match="wider than table 1's storage format bf16"):
        raw_lookup(bf16, 1, owned(bf16, 1)[:3], dtype=shard_pb2.FP32)
    tiny = ShardStore.from_slot_map(load_config("tiny"), shard_id=0, owners=even_slot_map(16, 2), epoch=1)
    with pytest.raises(ShardError, match="FP8_E4M3_UE8M0 needs rows of a multiple of 32 values; table 1 has 8"):
        raw_lookup(tiny, 1, owned(tiny, 1)[:3], dtype=FP8)  # 8-dim rows have no fp8 form: a request error, not a crash
    with pytest.raises(ConfigError, match="cluster.wire_dtype: bf16 rows are wider"):
        load_config("tiny", overrides=[*FP8_LAYOUT, "engram.row_format=fp8", "cluster.wire_dtype=bf16"])


def test_fp32_storage_quantises_on_the_shard_for_an_fp8_lookup() -> None:
    store = make("fp32", wire="fp8")
    rows = owned(store, 1)[::3]
    dim = store.layouts[1].dim
    got = np.frombuffer(raw_lookup(store, 1, rows, dtype=FP8), dtype=np.uint8).reshape(rows.size, dim + 2)
    values, scales = quantize_fp8(init(store, 1, rows))  # numpy reference (tested against torch's float8)
    assert np.array_equal(got[:, :dim], values) and np.array_equal(got[:, dim:], scales)
    bf16 = np.frombuffer(raw_lookup(store, 1, rows, dtype=shard_pb2.BF16), dtype=np.uint8).size  # the mirror path
    assert got.size / bf16 == (dim + 2) / (2 * dim)


def test_fp8_table_refuses_gradients_naming_the_format() -> None:
    store = make("fp8")
    rows = owned(store, 1)[:4]
    before = store.view.tables[1].weights.clone()
    with pytest.raises(ShardError) as err:
        store.prepare_update(
            table=1,
            epoch=1,
            row_ids=pack_ids(rows),
            grads=b"\0" * (4 * 64 * 4),
            step=1,
            kind="adam",
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        )
    assert err.value.code == Code.FAILED_PRECONDITION
    assert (
        "ApplyGradients: table 1 is stored as fp8 (E4M3 values + UE8M0 block-32 scales), which is read-only"
        in err.value.message
    )
    assert torch.equal(store.view.tables[1].weights, before)


def test_bf16_storage_trains_in_fp32_and_rounds_back() -> None:
    store = make("bf16", optimizer="adagrad")
    rows = owned(store, 1)[:5]
    dim = store.layouts[1].dim
    start = torch.from_numpy(init(store, 1, rows)).to(torch.bfloat16)
    served = torch.frombuffer(bytearray(raw_lookup(store, 1, rows, dtype=shard_pb2.BF16)), dtype=torch.bfloat16)
    assert torch.equal(served.view(rows.size, dim), start)
    g = torch.ones(rows.size, dim)
    store.apply_update(
        store.prepare_update(
            table=1,
            epoch=1,
            row_ids=pack_ids(rows),
            grads=g.numpy().tobytes(),
            step=1,
            kind="adagrad",
            lr=0.5,
            beta1=0,
            beta2=0,
            eps=1e-10,
        )
    )
    after = torch.frombuffer(bytearray(raw_lookup(store, 1, rows, dtype=shard_pb2.BF16)), dtype=torch.bfloat16)
    assert torch.equal(after.view(rows.size, dim), (start.float() - 0.5).to(torch.bfloat16))  # adagrad: lr*sign
    fp16 = torch.frombuffer(bytearray(raw_lookup(store, 1, rows, dtype=shard_pb2.FP16)), dtype=torch.float16)
    assert torch.equal(fp16.view(rows.size, dim), after.view(rows.size, dim).to(torch.float16))


def test_fp8_slot_files_and_migration_chunks_keep_the_bytes(tmp_path) -> None:
    src, dst = make("fp8", 0), make("fp8", 1)
    table, dim = 1, src.layouts[1].dim
    slot = src.view.owned[0]
    meta = ckpt.SlotMeta(table, slot, 16, slot_num_rows(src.layouts[1].num_rows, slot, 16), dim, "adam", "fp8")
    assert meta.file_bytes == 48 + meta.rows * (dim + 2)  # no optimizer state
    block = src.slot_block(table, slot)
    f = ckpt.write_slot(tmp_path, meta, block)
    assert (tmp_path / f["path"]).stat().st_size == meta.file_bytes
    assert ckpt.verify_slot(str(tmp_path), f["path"], f["sha256"], meta=meta) == 0
    fp32_meta = ckpt.SlotMeta(table, slot, 16, meta.rows, dim, "adam")
    with pytest.raises(ShardError, match="row format code 3 \\(expected 0\\)"):
        ckpt.check_header(tmp_path / f["path"], (tmp_path / f["path"]).read_bytes()[:48], fp32_meta)

    staging = Staging(dst)
    chunks = list(slot_chunks(src, table=table, slot=slot, epoch=1, chunk_bytes=10 * (dim + 2)))
    assert len(chunks) > 1 and all(len(c.weights) % (dim + 2) == 0 and not c.state for c in chunks)
    assert [staging.add(c) for c in chunks][-1]
    assert torch.equal(staging.complete[(table, slot)].weights, block.weights)
    bad = shard_pb2.SlotChunk(table=table, slot=slot, epoch=1, weights=chunks[0].weights, state=b"\0" * 8, last=True)
    with pytest.raises(ShardError, match="expected 0 \\(no state: the table is read-only\\)"):
        staging.add(bad)


def test_dequantise_on_the_device_of_the_rows() -> None:
    x = np.random.default_rng(1).normal(size=(7, 64)).astype(np.float32)
    packed = torch.from_numpy(encode_rows(x, "fp8"))  # (7, 66)
    want = torch.from_numpy(dequantize_fp8_numpy(packed[:, :64].numpy(), packed[:, 64:].numpy()))
    assert torch.equal(wire_to_values(packed, dim=64, fp8=True, dtype=torch.float32), want)
    with pytest.raises(ValueError, match="expected \\(U, 66\\) uint8"):
        wire_to_values(packed[:, :65], dim=64, fp8=True)
    if torch.cuda.is_available():
        on_gpu = wire_to_values(packed, dim=64, fp8=True, device="cuda", dtype=torch.float32)
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), want)


def test_cpu_bf16_dequantisation_table_equals_the_float_path() -> None:
    from engram.row_format import dequantize_fp8

    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], dtype=np.uint8)  # every finite E4M3 code
    values = torch.from_numpy(np.resize(codes, (6, 256)))  # (6, 256)
    scales = torch.tensor([0, 1, 100, 127, 200, 254], dtype=torch.uint8).unsqueeze(1).repeat(1, 8)  # (6, 8)
    fast = dequantize_fp8(values, scales)  # bf16 on the CPU: the table path
    slow = dequantize_fp8(values, scales, torch.float32).to(torch.bfloat16)  # float8 -> fp32 -> bf16
    assert torch.equal(fast.view(torch.int16), slow.view(torch.int16))  # bit for bit, subnormals included
