"""An issued lookup: the requests are in flight as soon as the handle exists; await it later.

    handle = client.lookup(table, ids)           # ids (B, T, H): requests leave now
    ...                                          # run layers 0..l-1
    rows = await handle                          # (B, T, H, D)
    uniq, inv = await handle.unique_rows(), handle.inverse   # (U, D), (B*T*H,)
    handle.applied_step                          # oldest applied step of the shards that answered

fp8 lookups (wire_dtype="fp8") land as (U, D + D/32) bytes; `rows()`/`unique_rows()` dequantise
them to bf16 (fp32 with upcast), on `device` when given (a GPU: the bytes go over, then the
values are computed there); `wire_rows()` gives the bytes as they came.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import numpy as np
import torch

from services.client.dequant import wire_to_values
from services.client.routing import Dedup, expand
from services.telemetry import span as trace_span


class LookupHandle:
    def __init__(
        self,
        *,
        table: int,
        dedup: Dedup,
        task: asyncio.Future,
        upcast: bool,
        span: Any = None,
        dim: int = 0,
        fp8: bool = False,
    ) -> None:
        self.table = table
        self._dim, self._fp8 = dim, fp8  # fp8: the rows travel as (U, D + D/32) bytes
        self._span = span  # the lookup's trace span: "prefetch.wait" joins its trace when nothing else is current
        self._dedup = dedup
        self._task = task
        self._upcast = upcast
        self._rows: torch.Tensor | None = None
        self._inverse: np.ndarray | None = dedup.inverse
        self._applied: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the requested ids; the rows are (*shape, D)."""
        return self._dedup.shape

    @property
    def unique_ids(self) -> np.ndarray:
        """(U,) int64 distinct ids (sorted when the request had duplicates, else request order)."""
        return self._dedup.unique

    @property
    def inverse(self) -> np.ndarray:
        """(N,) int64: request position i holds unique row inverse[i]."""
        if self._inverse is None:
            self._inverse = np.arange(self._dedup.unique.size, dtype=np.int64)
        return self._inverse

    @property
    def has_duplicates(self) -> bool:
        return self._dedup.inverse is not None

    @property
    def applied_step(self) -> int | None:
        """Oldest applied_step (last optimizer step applied to the table) among the shards that
        answered; None before the rows arrived, or when no shard was asked (no ids)."""
        if self._applied is None and self._task.done() and not self._task.cancelled() and not self._task.exception():
            self._applied = self._task.result()[1]
        return self._applied

    def done(self) -> bool:
        return self._task.done()

    async def _landed(self) -> torch.Tensor:
        if self._task.done():  # e.g. a shm read done at issue: still yield once, so that a caller's loop
            await asyncio.sleep(0)  # of lookups cannot starve the other tasks on this event loop
            rows, self._applied = self._task.result()  # (no shield: nothing left to protect)
            return rows
        rows, self._applied = await asyncio.shield(self._task)
        return rows

    def cancel(self) -> None:
        self._task.cancel()

    def _values(self, rows: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
        dtype = torch.float32 if self._upcast else None
        return wire_to_values(rows, dim=self._dim, fp8=self._fp8, device=device, dtype=dtype)

    async def wire_rows(self) -> torch.Tensor:
        """(U, D) rows of `unique_ids` as they travelled (fp8: (U, D + D/32) bytes, values then scales)."""
        with trace_span("prefetch.wait", parent=self._span, table=self.table, ready=self._task.done()):
            return await self._landed()

    async def unique_rows(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(U, D) rows of `unique_ids` in the wire dtype (bf16 for fp8; fp32 if the lookup asked for upcast).

        May share memory with the received message: treat it as read-only (clone to write).
        """
        return self._values(await self.wire_rows(), device)

    async def rows(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(*shape, D) rows in request order (dequantised first, on `device`, when they are fp8)."""
        if self._rows is None or (device is not None and self._rows.device != torch.device(device)):
            with trace_span("prefetch.wait", parent=self._span, table=self.table, ready=self._task.done()):
                unique = await self._landed()
            if not self._fp8 and device is None:  # as they came: expand the narrow rows, then upcast
                rows = expand(unique, self._dedup)
                self._rows = rows.float() if self._upcast else rows
            else:
                self._rows = _expand_on(self._values(unique, device), self._dedup)
        return self._rows

    def __await__(self) -> Generator[Any, None, torch.Tensor]:
        return self.rows().__await__()


def _expand_on(values: torch.Tensor, d: Dedup) -> torch.Tensor:
    """(U, D) values on any device -> (*shape, D) in request order."""
    if values.device.type == "cpu" or d.inverse is None:
        return expand(values, d)
    inverse = torch.from_numpy(d.inverse).to(values.device, non_blocking=True)  # (N,)
    return values.index_select(0, inverse).view(*d.shape, values.shape[1])
