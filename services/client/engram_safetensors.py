"""Engram tables in and out of a safetensors checkpoint in DeepSeek-V4.1-Flash's naming.

Per Engram layer L (0-based model layer, = our table id):

    layers.{L}.engram.embed.weight   F8_E4M3  [rows, D]      E4M3 values
    layers.{L}.engram.embed.scale    F8_E8M0  [rows, D/32]   one UE8M0 scale per 32 values

One flat table per layer: row r of the tensors is global row r of our table, the heads' blocks
concatenated in (order, head) order at offsets of their primes' running sum, rows addressed
`hash % prime + offset` (engram/layout.py), so rows map one to one with no reordering; the row
count must equal the sum of the layer's primes. A directory holds one file or several with a
`model.safetensors.index.json` weight map.

Import (`import_checkpoint`): every tensor is checked against the cluster's layout and hashed
(sha256 per tensor) before anything is written; then the rows go slot by slot, values and
scales side by side, into slot files (`write_table_slots`, the `engram cluster load` path:
bounded memory, resumable from its progress file) and one `Restore` on every shard; finally
every row is read back through fp8 lookups and hashed again, which must give the file's
digests. Nothing reaches the shards before the whole checkpoint verified and every slot file
is written, so a bad checkpoint or an interrupted run leaves the served tables as they were.
The verified import's manifest goes to the control plane: a shard that restarts restores it.
Export (`export_checkpoint`) streams the rows back out through fp8 lookups, chunk by chunk, into
one file per layer laid out as the safetensors library lays it out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.layout import TableLayout
from engram.row_format import FP8_BLOCK
from services.client.safetensors_io import (
    SafetensorsError,
    TensorEntry,
    TensorFile,
    create_file,
    layout_tensors,
    read_header,
    sha256_region,
    write_at,
)
from services.client.table_load import write_table_slots

INDEX = "model.safetensors.index.json"
SOURCE = "source.json"  # beside the slot files: which checkpoint (its digests) they come from
WEIGHT, SCALE = "layers.{}.engram.embed.weight", "layers.{}.engram.embed.scale"
READ_AHEAD = 4  # lookups in flight while reading a table back


class CheckpointError(ValueError):
    """The checkpoint does not fit the cluster, or is damaged; nothing was imported."""


@dataclass(frozen=True, slots=True)
class EngramTable:
    """One layer's fp8 rows in a checkpoint: `[a:b:step]` -> (n, D + D/32) uint8, values then scales."""

    layer: int
    dim: int
    weight: tuple[TensorFile, TensorEntry]
    scale: tuple[TensorFile, TensorEntry]

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight[1].shape[0], self.dim + self.dim // FP8_BLOCK

    def __getitem__(self, rows: slice) -> torch.Tensor:
        values = self.weight[0].rows(self.weight[1].name)[rows]  # (n, D), strided reads of the memory map
        scales = self.scale[0].rows(self.scale[1].name)[rows]  # (n, D/32)
        return torch.from_numpy(np.concatenate([values, scales], axis=1))  # (n, D + D/32)


@dataclass(slots=True)
class Report:
    digests: dict[str, str]  # tensor name -> sha256 of its bytes
    files: list[str] = field(default_factory=list)
    slots_restored: int = 0
    slots_reused: int = 0
    rows: int = 0


def open_checkpoint(directory: str | Path) -> dict[str, TensorFile]:
    """tensor name -> its file, over the index's files (or every *.safetensors), headers checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory}: not a directory")
    index = directory / INDEX
    try:
        if index.is_file():
            data = json.loads(index.read_text())
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map object")
            bad = [n for n in weight_map.values() if not isinstance(n, str) or "/" in n or n.startswith(".")]
            if bad:
                raise CheckpointError(f"{index}: weight_map names files outside the directory: {bad[:4]}")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(f"{index}: files {missing[:4]} of the weight map do not exist")
            files = {n: read_header(directory / n) for n in names}
            out = {}
            for tensor, name in weight_map.items():
                if tensor not in files[name].tensors:
                    raise CheckpointError(f"{index}: {tensor} is mapped to {name}, which does not hold it")
                out[tensor] = files[name]
            return out
        paths = sorted(directory.glob("*.safetensors"))
        if not paths:
            raise CheckpointError(f"checkpoint {directory}: no {INDEX} and no *.safetensors files")
        out = {}
        for p in paths:
            tf = read_header(p)
            for tensor in tf.tensors:
                if tensor in out:
                    raise CheckpointError(
                        f"checkpoint {directory}: {tensor} is in both {out[tensor].path.name} and {p.name}"
                    )
                out[tensor] = tf
        return out
    except (SafetensorsError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(str(exc)) from None


def engram_tables(files: dict[str, TensorFile], layouts: dict[int, TableLayout]) -> dict[int, EngramTable]:
    """Check every Engram tensor against the cluster's layout -> {layer: table}."""
    tables = {}
    extra = sorted(
        n
        for n in files
        if ".engram.embed." in n and n not in {f.format(layer) for layer in layouts for f in (WEIGHT, SCALE)}
    )
    if extra:
        raise CheckpointError(
            f"{extra[0]}: the cluster has no such Engram table (its tables are layers "
            f"{sorted(layouts)}); {len(extra)} unexpected Engram tensors"
        )
    for layer, lay in sorted(layouts.items()):
        w_name, s_name = WEIGHT.format(layer), SCALE.format(layer)
        for name, what in ((w_name, "value"), (s_name, "scale")):
            if name not in files:
                raise CheckpointError(f"missing {what} tensor {name} (Engram layers of the cluster: {sorted(layouts)})")
        w, s = files[w_name].tensors[w_name], files[s_name].tensors[s_name]
        for e, dtype in ((w, "F8_E4M3"), (s, "F8_E8M0")):
            if e.dtype != dtype:
                raise CheckpointError(f"{e.name}: wrong dtype {e.dtype}, expected {dtype}")
        blocks = lay.dim // FP8_BLOCK
        if len(w.shape) != 2 or w.shape[1] != lay.dim:
            raise CheckpointError(f"{w_name}: wrong shape {list(w.shape)}, expected [rows, {lay.dim}]")
        if len(s.shape) != 2 or s.shape[1] != blocks or s.shape[0] != w.shape[0]:
            raise CheckpointError(
                f"{s_name}: wrong shape {list(s.shape)}, expected [{w.shape[0]}, {blocks}] "
                f"(one scale per {FP8_BLOCK} values of each row)"
            )
        if w.shape[0] != lay.num_rows:
            raise CheckpointError(
                f"{w_name}: {w.shape[0]} rows, but layer {layer}'s layout has {lay.num_rows} (the sum of its "
                f"{len(lay.head_sizes)} head primes {lay.head_sizes[0]}..{lay.head_sizes[-1]}); the checkpoint "
                "was built for another engram config (table_size_per_ngram, heads, orders or layers)"
            )
        tables[layer] = EngramTable(layer=layer, dim=lay.dim, weight=(files[w_name], w), scale=(files[s_name], s))
    return tables


def source_digests(tables: dict[int, EngramTable]) -> dict[str, str]:
    out = {}
    for t in tables.values():
        for tf, e in (t.weight, t.scale):
            out[e.name] = sha256_region(tf.path, e.start, e.nbytes)
    return out


def _check_source(slot_dir: Path, digests: dict[str, str]) -> None:
    """The slot directory holds (part of) this checkpoint's import, or nothing yet."""
    slot_dir.mkdir(parents=True, exist_ok=True)
    src = slot_dir / SOURCE
    if src.is_file():
        if json.loads(src.read_text()) != digests:
            raise CheckpointError(
                f"{slot_dir} holds slot files of another checkpoint (see {src}); import into a "
                "new directory (--dir) or remove it"
            )
        return
    tmp = slot_dir / f".{SOURCE}.tmp"
    tmp.write_text(json.dumps(digests, indent=1, sort_keys=True))
    os.replace(tmp, src)


async def import_checkpoint(
    client: Any,
    directory: str | Path,
    *,
    slot_dir: str | Path,
    on_slot: Callable[[int, int, bool], None] | None = None,
) -> Report:
    """Check, hash, write slot files (resumable), restore on every shard, read back and compare."""
    fmt = client.cfg.engram.row_format
    if fmt != "fp8":
        raise CheckpointError(
            f"the cluster stores engram.row_format={fmt}; an fp8 checkpoint imports into an fp8 "
            "cluster (init it with engram.row_format=fp8 cluster.wire_dtype=fp8)"
        )
    tables = engram_tables(await asyncio.to_thread(open_checkpoint, directory), client.layouts)
    digests = await asyncio.to_thread(source_digests, tables)
    slot_dir = Path(slot_dir).resolve()
    await asyncio.to_thread(_check_source, slot_dir, digests)
    reused = 0

    def tick(table: int, slot: int, skipped: bool) -> None:
        nonlocal reused
        reused += skipped
        if on_slot is not None:
            on_slot(table, slot, skipped)

    manifest = await asyncio.to_thread(
        write_table_slots,
        tables,
        client.layouts,
        directory=slot_dir,
        name=slot_dir.name,
        num_slots=client.cfg.cluster.num_slots,
        kind=client.cfg.cluster.optimizer,
        step=0,
        on_slot=tick,
        fmt="fp8",
    )
    result = await client.restore(manifest)
    served = await served_digests(client)
    wrong = sorted(n for n in digests if served.get(n) != digests[n])
    if wrong:
        raise CheckpointError(
            f"read back after the import, {wrong[0]} has sha256 {served.get(wrong[0])}, the file "
            f"{digests[wrong[0]]}: the shards do not hold the checkpoint's rows"
        )
    if client.control is not None:  # a shard that restarts restores these slot files (kept in slot_dir)
        await client.control.put_manifest({**manifest, "source": str(Path(directory).resolve()), "sha256": digests})
    return Report(
        digests=digests,
        slots_restored=int(result["slots_restored"]),
        slots_reused=reused,
        rows=sum(t.shape[0] for t in tables.values()),
    )


async def _chunks(client: Any, layer: int, chunk_rows: int):
    """(first row, (n, D + D/32) fp8 rows) of `layer` in row order, READ_AHEAD lookups in flight."""
    n = client.layouts[layer].num_rows
    starts = list(range(0, n, chunk_rows))
    pending: list = []
    try:
        for a in [*starts, *[None] * READ_AHEAD]:
            if a is not None:
                pending.append((a, client.lookup(layer, np.arange(a, min(n, a + chunk_rows)), dedup_ids=False)))
            if pending and (len(pending) > READ_AHEAD or a is None):
                first, handle = pending.pop(0)
                yield first, await handle.wire_rows()
    finally:
        for _, handle in pending:
            handle.cancel()


def _fp8_client(client: Any) -> None:
    if client.wire_dtype != "fp8":
        raise CheckpointError(
            f"the client asks for {client.wire_dtype} rows; reading an fp8 checkpoint's rows needs wire_dtype='fp8'"
        )


async def served_digests(client: Any, *, chunk_rows: int = 1 << 16) -> dict[str, str]:
    """sha256 of every Engram tensor as the cluster serves it (fp8 lookups of every row, in order)."""
    _fp8_client(client)
    out = {}
    for layer, lay in sorted(client.layouts.items()):
        hw, hs = hashlib.sha256(), hashlib.sha256()
        async for _, rows in _chunks(client, layer, chunk_rows):
            hw.update(rows[:, : lay.dim].contiguous().numpy())
            hs.update(rows[:, lay.dim :].contiguous().numpy())
        out[WEIGHT.format(layer)], out[SCALE.format(layer)] = hw.hexdigest(), hs.hexdigest()
    return out


async def export_checkpoint(
    client: Any,
    directory: str | Path,
    *,
    chunk_rows: int = 1 << 16,
    on_rows: Callable[[int], None] | None = None,
) -> Report:
    """Every Engram table as fp8 safetensors, one file per layer plus the index -> digests per tensor."""
    _fp8_client(client)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = sorted(client.layouts)
    report = Report(digests={})
    weight_map, total = {}, 0
    for i, layer in enumerate(layers):
        lay = client.layouts[layer]
        name = f"model-{i + 1:05d}-of-{len(layers):05d}.safetensors"
        w_name, s_name = WEIGHT.format(layer), SCALE.format(layer)
        head, where = layout_tensors(
            [(w_name, "F8_E4M3", (lay.num_rows, lay.dim)), (s_name, "F8_E8M0", (lay.num_rows, lay.dim // FP8_BLOCK))],
            metadata={"format": "pt"},
        )
        data_bytes = sum(e.nbytes for e in where.values())
        tmp = directory / f".{name}.tmp-{os.getpid()}"
        fd = await asyncio.to_thread(create_file, tmp, head, data_bytes)
        hw, hs = hashlib.sha256(), hashlib.sha256()
        try:
            async for a, rows in _chunks(client, layer, chunk_rows):
                values, scales = rows[:, : lay.dim].contiguous().numpy(), rows[:, lay.dim :].contiguous().numpy()
                write_at(fd, where[w_name].start + a * lay.dim, values)
                write_at(fd, where[s_name].start + a * (lay.dim // FP8_BLOCK), scales)
                hw.update(values)
                hs.update(scales)
                if on_rows is not None:
                    on_rows(rows.shape[0])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, directory / name)
        report.digests[w_name], report.digests[s_name] = hw.hexdigest(), hs.hexdigest()
        report.files.append(name)
        report.rows += lay.num_rows
        weight_map.update({w_name: name, s_name: name})
        total += data_bytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = directory / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, directory / INDEX)
    report.files.append(INDEX)
    return report
