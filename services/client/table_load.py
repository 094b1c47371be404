"""Load trained Engram tables into a running cluster: slot files, then a Restore on every shard.

Shards import rows two ways: `ImportSlots` stages slots a shard does *not* own (a migration,
swapped in by the next slot-map epoch), and `Restore` loads owned slots from per-slot files.
Loading a model's tables replaces owned slots without moving them, so it goes through the
checkpoint format (services/shard/checkpoint.py): one file per (table, slot) written under
checkpoint `name` under the checkpoint root the shards share (cluster.checkpoint_dir), then
`ShardClient.restore` (which names the checkpoint, never a path).

- bounded memory: one slot's rows (a strided view of the table: row r -> slot r % num_slots)
  and its zero optimizer state are in memory at a time; the table itself may be memory-mapped.
- resumable: `progress.json` lists the slot files written (path, sha256, size); a re-run
  skips a slot whose file is there with that size, and writes the rest.
- the optimizer state of loaded rows is zero (a fresh optimizer): enough to serve, and a
  training run resumes with fresh moments for these rows.
- `fmt` is the tables' storage format (engram.row_format): the rows are written as given, in it
  (fp8: (rows, D + D/32) bytes, values then scales, no optimizer state; services/client/engram_safetensors.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from engram.fileio import atomic_write_text, fsync_dir
from engram.layout import TableLayout, slot_num_rows
from engram.torch_io import load_checkpoint_file
from services.shard.checkpoint import SlotMeta, slot_path, write_slot
from services.shard.memory import alloc_state
from services.shard.row_store_format import STORAGE_DTYPES, read_only, storage_cols
from services.shard.store import SlotData

PROGRESS = "progress.json"


def _save_progress(directory: Path, done: dict[str, dict]) -> None:
    atomic_write_text(directory / PROGRESS, json.dumps(done))


class RowTable(Protocol):
    """What `write_table_slots` reads of a table: its shape and strided row slices as tensors."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: slice, /) -> torch.Tensor: ...


def write_table_slots(
    tables: Mapping[int, RowTable],
    layouts: dict[int, TableLayout],
    *,
    directory: str | Path,
    name: str,
    num_slots: int,
    kind: str,
    step: int,
    on_slot: Callable[[int, int, bool], None] | None = None,
    fmt: str = "fp32",
) -> dict[str, Any]:
    """Every (table, slot) of `tables` {layer: (rows, dim)} as slot files in `directory` (checkpoint `name`
    under the shards' checkpoint root) -> a restore manifest.

    `tables` values need `.shape` and `[slot::num_slots]` (a tensor, a memory map, a lazy reader);
    for a `fmt` other than fp32 they hold the stored rows, (rows, storage cols) in that format.

    `on_slot(table, slot, skipped)` is called after each slot (progress bars, tests).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    if (directory / PROGRESS).is_file():
        done = json.loads((directory / PROGRESS).read_text())
    for layer, layout in layouts.items():
        table = tables.get(layer)
        if table is None:
            raise ValueError(f"checkpoint: no table for Engram layer {layer}")
        want = (layout.num_rows, storage_cols(fmt, layout.dim))
        if tuple(table.shape) != want:
            raise ValueError(
                f"checkpoint: table {layer} is {tuple(table.shape)}, the cluster's layout is {want} ({fmt} rows)"
            )
    files = []
    for layer, layout in sorted(layouts.items()):
        table = tables[layer]
        for slot in range(min(num_slots, layout.num_rows)):
            key = f"{layer}/{slot}"
            rows = slot_num_rows(layout.num_rows, slot, num_slots)
            meta = SlotMeta(table=layer, slot=slot, num_slots=num_slots, rows=rows, dim=layout.dim, kind=kind, fmt=fmt)
            prev = done.get(key)
            path = directory / slot_path(layer, slot)
            if prev is not None and path.is_file() and path.stat().st_size == prev["num_bytes"] == meta.file_bytes:
                files.append(prev)
                if on_slot is not None:
                    on_slot(layer, slot, True)
                continue
            block = SlotData(  # (rows, dim) in fmt: global rows slot, slot + num_slots, ...
                weights=table[slot::num_slots].detach().to(STORAGE_DTYPES[fmt]).contiguous(),
                state=() if read_only(fmt) else alloc_state(kind, rows, layout.dim),
                applied_step=step,
            )
            entry = write_slot(directory, meta, block)
            files.append(entry)
            done[key] = entry
            _save_progress(directory, done)
            if on_slot is not None:
                on_slot(layer, slot, False)
    for sub in {directory / slot_path(t, 0) for t in layouts}:
        fsync_dir(sub.parent)
    return {"step": int(step), "name": name, "num_slots": num_slots, "epoch": 0, "files": files, "created": time.time()}


def checkpoint_tables(path: str | Path) -> tuple[dict[str, Any], dict[int, torch.Tensor], int]:
    """(config dict, {layer: table (rows, dim)}, step) of an `engram train` checkpoint, memory-mapped."""
    state = load_checkpoint_file(path, mmap=True)
    tables = {
        int(k.split(".")[1]): v for k, v in state["model"].items() if k.startswith("tables.") and k.endswith(".weight")
    }
    return state["config"], tables, int(state.get("step", 0))
