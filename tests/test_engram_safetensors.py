"""`engram cluster import/export` with synthetic checkpoints in DeepSeek-V4.1-Flash's tensor layout,
against a real 2-shard fp8 cluster (real redis-server, real shard processes).

The layout is V4.1-Flash's shape at small primes: layers [1, 2], orders 2..4, 8 heads per order,
256 dims per head stored as fp8 (264 bytes a row); the checkpoints are written by the safetensors
library itself (`layers.{L}.engram.embed.weight` F8_E4M3 [rows, 256], `.scale` F8_E8M0 [rows, 8]).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram.config import load_config
from engram.layout import table_layouts
from engram.row_format import dequantize_fp8_numpy, quantize_fp8
from services.client import ShardClient
from services.client.engram_safetensors import (
    INDEX,
    CheckpointError,
    import_checkpoint,
    served_digests,
)
from services.client.safetensors_io import layout_tensors
from tests import fixtures_tls
from tests.fixtures_procs import cluster_fixture, engram_cli, run

LAYOUT = [
    "model.n_layer=4",
    "engram.layer_ids=[1,2]",
    "engram.max_ngram_size=4",
    "engram.n_head_per_ngram=8",
    "engram.n_embed_per_ngram=2048",
    "engram.table_size_per_ngram=[101,101,101]",
    "engram.row_format=fp8",
    "cluster.wire_dtype=fp8",
]
cluster = cluster_fixture(num_shards=2, overrides=LAYOUT)
pytestmark = pytest.mark.timeout(240)
LAYOUTS = table_layouts(load_config("tiny", overrides=LAYOUT).engram)


def fp8_rows(layer: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed + layer).normal(scale=0.05, size=(rows, 256)).astype(np.float32)
    return quantize_fp8(x)  # (rows, 256) E4M3 codes, (rows, 8) E8M0 codes


def write_checkpoint(
    directory: Path, *, seed: int = 7, rows: dict[int, int] | None = None, mutate=None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One file per layer + the index, as the safetensors library writes them -> {name: (values, scales)}."""
    directory.mkdir(parents=True)
    layers = sorted(LAYOUTS)
    weight_map, total, out = {}, 0, {}
    for i, layer in enumerate(layers):
        v, s = fp8_rows(layer, (rows or {}).get(layer, LAYOUTS[layer].num_rows), seed)
        tensors = {
            f"layers.{layer}.engram.embed.weight": torch.from_numpy(v).view(torch.float8_e4m3fn),
            f"layers.{layer}.engram.embed.scale": torch.from_numpy(s).view(torch.float8_e8m0fnu),
        }
        if mutate is not None:
            mutate(layer, tensors)
        name = f"model-{i + 1:05d}-of-{len(layers):05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() for t in tensors.values())
        out[f"layers.{layer}"] = (v, s)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


async def fp8_client(c, **kw) -> ShardClient:
    return await ShardClient.connect(c.control(), wire_dtype="fp8", security=c.security("admin"), **kw)


async def digests_now(c) -> dict[str, str]:
    client = await fp8_client(c)
    try:
        return await served_digests(client)
    finally:
        await client.close()


def test_safetensors_header_is_the_librarys(tmp_path) -> None:
    """Export lays files out byte for byte as the library does (tensor order, JSON, padding)."""
    v, s = fp8_rows(1, 37, 0)
    tensors = {
        "layers.1.engram.embed.weight": torch.from_numpy(v).view(torch.float8_e4m3fn),
        "layers.1.engram.embed.scale": torch.from_numpy(s).view(torch.float8_e8m0fnu),
    }
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    head, where = layout_tensors(
        [(n, "F8_E4M3" if n.endswith("weight") else "F8_E8M0", tuple(t.shape)) for n, t in tensors.items()],
        metadata={"format": "pt"},
    )
    raw = (tmp_path / "a.safetensors").read_bytes()
    assert raw[: len(head)] == head
    e = where["layers.1.engram.embed.weight"]
    assert raw[e.start : e.start + e.nbytes] == v.tobytes()


def test_import_lookup_export_round_trip(cluster, tmp_path) -> None:
    src = tmp_path / "ckpt"
    rows = write_checkpoint(src)
    sets = [f"--set={o}" for o in [*cluster.cluster_overrides, *cluster.client_overrides("admin")]]  # the CLI
    out = engram_cli(
        "cluster",
        "import",
        str(src),
        "--preset",
        "tiny",
        *sets,
        "--dir",
        str(tmp_path / "slots"),
        "--no-progress",
        timeout_s=180,
    )
    assert out.returncode == 0, out.stderr
    for layer, (v, s) in rows.items():  # the checksum of every tensor, as sha256sum would give it
        assert f"sha256 {hashlib.sha256(v.tobytes()).hexdigest()}  {layer}.engram.embed.weight" in out.stdout
        assert f"sha256 {hashlib.sha256(s.tobytes()).hexdigest()}  {layer}.engram.embed.scale" in out.stdout
    assert "every tensor's sha256 matches the checkpoint" in out.stdout

    async def lookups() -> None:
        for path in ("grpc", "tcp"):
            client = await fp8_client(cluster, row_path=path)
            try:
                for layer in LAYOUTS:
                    v, s = rows[f"layers.{layer}"]
                    ids = np.random.default_rng(layer).integers(0, v.shape[0], size=(3, 500))  # duplicates too
                    got = await client.lookup(layer, ids)  # (3, 500, 256) bf16, dequantised on the client
                    flat = ids.reshape(-1)
                    want = torch.from_numpy(dequantize_fp8_numpy(v[flat], s[flat])).to(torch.bfloat16)
                    assert got.dtype == torch.bfloat16 and torch.equal(got.reshape(-1, 256), want)
                assert client.row_paths.used[path] > 0, client.row_paths.used
            finally:
                await client.close()

    run(lookups(), timeout_s=120)
    dst = tmp_path / "export"
    out = engram_cli(
        "cluster", "export", str(dst), "--preset", "tiny", *sets, "--chunk-rows", "1000", "--no-progress", timeout_s=180
    )
    assert out.returncode == 0, out.stderr
    for f in sorted(src.iterdir()):
        assert (dst / f.name).read_bytes() == f.read_bytes(), f"{f.name} differs"  # byte-identical, index too
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())


def _bad(name: str, tmp_path: Path) -> Path:
    d = tmp_path / name
    if name == "wrong_shape":
        write_checkpoint(
            d,
            mutate=lambda layer, t: t.update(
                {f"layers.{layer}.engram.embed.weight": t[f"layers.{layer}.engram.embed.weight"][:, :128].contiguous()}
            ),
        )
    elif name == "wrong_dtype":
        write_checkpoint(
            d,
            mutate=lambda layer, t: t.update(
                {f"layers.{layer}.engram.embed.weight": t[f"layers.{layer}.engram.embed.weight"].float()}
            ),
        )
    elif name == "missing_scale":
        write_checkpoint(d, mutate=lambda layer, t: t.pop(f"layers.{layer}.engram.embed.scale") if layer == 2 else None)
    elif name == "row_count":
        write_checkpoint(d, rows={2: LAYOUTS[2].num_rows - 1})
    elif name == "truncated":
        write_checkpoint(d)
        f = d / "model-00002-of-00002.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
    return d


BAD = {
    "wrong_shape": "layers.1.engram.embed.weight: wrong shape [",
    "wrong_dtype": "layers.1.engram.embed.weight: wrong dtype F32, expected F8_E4M3",
    "missing_scale": "missing scale tensor layers.2.engram.embed.scale",
    "row_count": f"layers.2.engram.embed.weight: {LAYOUTS[2].num_rows - 1} rows, but layer 2's layout has "
    f"{LAYOUTS[2].num_rows} (the sum of its 24 head primes",
    "truncated": "model-00002-of-00002.safetensors: truncated: tensor layers.2.engram.embed.weight ends at byte",
}


def test_bad_checkpoints_are_refused_and_nothing_is_imported(cluster, tmp_path) -> None:
    before = run(digests_now(cluster), timeout_s=60)

    async def attempt(d: Path) -> str:
        client = await fp8_client(cluster)
        try:
            with pytest.raises(CheckpointError) as err:
                await import_checkpoint(client, d, slot_dir=cluster.checkpoint_dir / f"slots-{d.name}")
            return str(err.value)
        finally:
            await client.close()

    for name, text in BAD.items():
        message = run(attempt(_bad(name, tmp_path)), timeout_s=60)
        assert text in message, (name, message)
        assert not list((cluster.checkpoint_dir / f"slots-{name}").glob("table*")), name  # not one slot file written
    assert run(digests_now(cluster), timeout_s=60) == before  # the shards serve what they served

    sets = [
        f"--set={o}" for o in [*cluster.cluster_overrides, *cluster.client_overrides("admin")]
    ]  # the CLI  # the CLI says the same, exit 1
    out = engram_cli(
        "cluster",
        "import",
        str(tmp_path / "row_count"),
        "--preset",
        "tiny",
        *sets,
        "--no-progress",
        "--dir",
        str(tmp_path / "cli-slots"),
    )
    assert out.returncode == 1 and BAD["row_count"] in out.stderr and "nothing was imported" in out.stderr


def test_interrupted_import_leaves_nothing_visible_then_resumes(cluster, tmp_path) -> None:
    src = tmp_path / "ckpt"
    rows = write_checkpoint(src, seed=99)
    slots = cluster.checkpoint_dir / "slots-interrupted"
    before = run(digests_now(cluster), timeout_s=60)
    seen: list[bool] = []

    class Interrupted(Exception):
        pass

    def stop_after_5(table: int, slot: int, skipped: bool) -> None:
        seen.append(skipped)
        if len(seen) == 5:
            raise Interrupted  # the import dies here, 5 slot files in

    async def go(on_slot):
        client = await fp8_client(cluster)
        try:
            return await import_checkpoint(client, src, slot_dir=slots, on_slot=on_slot)
        finally:
            await client.close()

    with pytest.raises(Interrupted):
        run(go(stop_after_5), timeout_s=60)
    assert run(digests_now(cluster), timeout_s=60) == before  # half an import is never served
    seen.clear()
    report = run(go(lambda t, s, k: seen.append(k)), timeout_s=120)
    assert seen == [True] * 5 + [False] * 27 and report.slots_reused == 5  # 2 tables x 16 slots
    want = {
        f"{k}.engram.embed.{n}": hashlib.sha256(a.tobytes()).hexdigest()
        for k, (v, s) in rows.items()
        for n, a in (("weight", v), ("scale", s))
    }
    assert report.digests == want and run(digests_now(cluster), timeout_s=60) == want

    other = tmp_path / "other"
    write_checkpoint(other, seed=5)  # resuming into a directory of another checkpoint is refused
    with pytest.raises(CheckpointError, match="holds slot files of another checkpoint"):
        run(_import(cluster, other, slots), timeout_s=60)


async def _import(c, src: Path, slots: Path):
    client = await fp8_client(c)
    try:
        return await import_checkpoint(client, src, slot_dir=slots)
    finally:
        await client.close()


def test_fp8_tables_refuse_pushes_and_wider_lookups(cluster) -> None:
    import grpc

    from proto.shard.v1 import shard_pb2, shard_pb2_grpc

    async def go() -> None:
        client = await fp8_client(cluster)
        try:
            with pytest.raises(ValueError, match="stored as fp8 .* read-only"):
                await client.apply_gradients(
                    1, np.array([0]), torch.zeros(1, 256), step=1, optimizer={"kind": "adam", "lr": 0.1}
                )
            address = client.addresses[0]
            async with fixtures_tls.aio_channel(address, "train") as ch:  # a trainer's rights: push
                stub = shard_pb2_grpc.MemoryShardStub(ch)
                row = next(r for r in range(100) if client.owners[r % 16] == 0)
                req = shard_pb2.ApplyGradientsRequest(
                    table=1,
                    epoch=client.epoch,
                    row_ids=np.array([row], "<i8").tobytes(),
                    grads=np.zeros(256, "<f4").tobytes(),
                    step=1,
                    optimizer=shard_pb2.OptimizerParams(kind="adam", lr=0.1),
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ApplyGradients(req, timeout=10)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert (
                    "table 1 is stored as fp8 (E4M3 values + UE8M0 block-32 scales), which is read-only"
                    in err.value.details()
                )
                look = shard_pb2.LookupRequest(table=1, epoch=client.epoch, row_ids=req.row_ids, dtype=shard_pb2.BF16)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Lookup(look, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "BF16 (512 bytes/row) is wider than table 1's storage format fp8" in err.value.details()
        finally:
            await client.close()
        cp = cluster.control()
        try:
            with pytest.raises(ValueError, match="wire format bf16 .* wider than the table's storage format fp8"):
                await ShardClient.connect(cp, wire_dtype="bf16", security=cluster.security("read"))
        finally:
            await cp.close()

    run(go(), timeout_s=60)
