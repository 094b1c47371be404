"""Lookups answered on the calling thread from shared memory, before any task exists (a mixin of
`ShardLookups`): every shard of a small lookup (<= INLINE_SHM_BYTES of rows) mapped here, and
each read succeeding at once, else the lookup goes the async way (row_paths.py).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from opentelemetry import trace as otel_trace

from engram.layout import TableLayout
from services import telemetry
from services.client.routing import (
    as_id_array,
    check_range,
    check_range_small,
    new_rows,
    owner_shards,
    sole_owner,
    split_by_owner,
)
from services.client.row_paths import RowPaths
from services.client.row_request import RowRequest
from services.client.shm_paths import INLINE_SHM_BYTES
from services.client.shm_reader import ShmTableReader
from services.client.shm_small import SMALL_READ_ROWS, SmallReads, small_reads_for
from services.client.state import Routing
from services.wire import TORCH_DTYPES, row_bytes


class ShmNow:
    layouts: dict[int, TableLayout]
    _dtype: int
    _torch_dtype: torch.dtype
    row_paths: RowPaths
    _routing: Routing
    _kept_small: dict[int, tuple[Routing, tuple[ShmTableReader, ...], SmallReads | None]] | None = None  # per table
    _kept_owners: tuple[Routing, int | None, tuple[int, ...]] | None = None  # (its map, sole owner, owners)

    def layout(self, table: int) -> TableLayout:
        try:
            return self.layouts[table]
        except KeyError:
            raise ValueError(f"table {table}: no such Engram table (layers {sorted(self.layouts)})") from None

    def _read_now(
        self,
        table: int,
        ids: np.ndarray,
        *,
        step: int,
        max_staleness: int,
        open_files: bool = True,
        small: list[int] | None = None,
    ) -> tuple[torch.Tensor, int | None] | None:
        """(U,) distinct ids -> ((U, D) rows, oldest applied step) read from shared memory on this
        thread, when every shard of a small lookup (<= INLINE_SHM_BYTES) is mapped here and each
        read succeeds at once; else None and the lookup goes the async way (row_paths.py)."""
        dim = self.layouts[table].dim
        if self._dtype not in TORCH_DTYPES or not ids.size or ids.size * row_bytes(self._dtype, dim) > INLINE_SHM_BYTES:
            return None  # fp8 rows are not in shared memory
        if self.row_paths.mode not in ("auto", "shm"):
            return None
        routing = self._routing
        sole, shards = self._owners(routing)
        if ids.size <= SMALL_READ_ROWS:
            reads = self._small_reads(table, routing, shards)
            read = None if reads is None else reads.read(small or ids.tolist(), step=step, max_staleness=max_staleness)
            if read is not None:
                rows, oldest, shards_read = read
                self.row_paths.count_shm(ids.size, step, oldest, shards=shards_read)
                return rows, oldest
        out, out_rows = new_rows(ids.size, dim, self._torch_dtype)  # (U, D) and its (U,) opaque rows
        applied: int | None = None
        for g in split_by_owner(ids, routing.owners, sole=sole, shards=shards):
            address = routing.addresses.get(g.shard)
            part_rows = out_rows if g.positions is None else np.empty(g.ids.size, dtype=out_rows.dtype)  # (n_s,)
            got = (
                None
                if not address
                else self.row_paths.read_now(
                    RowRequest(table, g.ids, self._dtype, dim, routing.epoch, step, max_staleness),
                    address=address,
                    rows=part_rows,
                    open_files=open_files,
                )
            )
            if got is None:
                return None
            if g.positions is not None:
                out_rows[g.positions] = part_rows
            applied = got if applied is None else min(applied, got)
        return out, applied

    def read_now(
        self, table: int, row_ids: np.ndarray | torch.Tensor, *, step: int = 0, max_staleness: int = 0
    ) -> tuple[torch.Tensor, int | None] | None:
        """For a thread other than the client's loop (SyncShardClient): (U,) distinct ids -> ((U, D)
        rows in the wire dtype, oldest applied step) from shared memory now, or None (then call
        `lookup` on the loop). Only reads; shared-memory files are opened by loop-side lookups."""
        flat, _ = as_id_array(row_ids)  # (U,)
        small = flat.tolist() if flat.size <= SMALL_READ_ROWS else None  # a decode step's few rows: python ints
        if small is not None:
            check_range_small(small, flat, num_rows=self.layout(table).num_rows, table=table)
        else:
            check_range(flat, self.layout(table).num_rows, table)
        t0 = time.time_ns()
        now = self._read_now(table, flat, step=step, max_staleness=max_staleness, open_files=False, small=small)
        if now is not None:
            self._inline_span(t0, table=table, rows=int(flat.size), ids=int(flat.size))
        return now

    @staticmethod
    def _inline_span(t0_ns: int, *, table: int, rows: int, ids: int, row_path: str = "shm") -> Any:
        """The "lookup" span and client metrics of a lookup answered without a task (shared memory, or
        the data plane's future: tcp_now.py), from its issue until now."""
        telemetry.record_lookup((time.time_ns() - t0_ns) * 1e-9, rows, side="client", table=table)
        if not telemetry.enabled():
            return otel_trace.INVALID_SPAN
        sp = telemetry.tracer().start_span(
            "lookup", start_time=t0_ns, attributes={"table": table, "rows": rows, "ids": ids, "row_path": row_path}
        )
        sp.end()
        return sp

    def _small_reads(self, table: int, routing: Routing, shards: tuple[int, ...]) -> SmallReads | None:
        """The row-by-row reader of `table` for this map and the files open now; kept while both stay."""
        readers = self.row_paths.open_readers(routing.addresses, shards, table)
        if readers is None:
            return None
        files = tuple(readers.values())
        if self._kept_small is None:
            self._kept_small = {}
        kept = self._kept_small.get(table)
        if kept is None or kept[0] is not routing or kept[1] != files:
            small = small_reads_for(readers, routing.owners, epoch=routing.epoch, dtype=self._torch_dtype)
            kept = self._kept_small[table] = (routing, files, small)
        return kept[2]

    def _owners(self, routing: Routing) -> tuple[int | None, tuple[int, ...]]:
        """(the shard that owns every slot of `routing` or None, the shards that own slots); kept per map."""
        kept = self._kept_owners
        if kept is None or kept[0] is not routing:
            kept = self._kept_owners = (routing, sole_owner(routing.owners), owner_shards(routing.owners))
        return kept[1], kept[2]

    def _sole_owner(self, routing: Routing) -> int | None:
        """The shard that owns every slot of `routing` (one shard, or no map yet split), else None; kept per map."""
        return self._owners(routing)[0]
