"""An issued lookup: the requests are in flight as soon as the handle exists; await it later.

    handle = client.lookup(table, ids)           # ids (B, T, H): requests leave now
    ...                                          # run layers 0..l-1
    rows = await handle                          # (B, T, H, D)
    uniq, inv = await handle.unique_rows(), handle.inverse   # (U, D), (B*T*H,)
    handle.applied_step                          # oldest applied step of the shards that answered
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import Any

import numpy as np
import torch

from services.client.routing import Dedup, expand
from services.telemetry import span as trace_span


class LookupHandle:
    def __init__(self, *, table: int, dedup: Dedup, task: asyncio.Future, upcast: bool, span: Any = None) -> None:
        self.table = table
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
        rows, self._applied = await asyncio.shield(self._task)
        return rows

    def cancel(self) -> None:
        self._task.cancel()

    async def unique_rows(self) -> torch.Tensor:
        """(U, D) rows of `unique_ids` in the wire dtype (fp32 if the lookup asked for upcast).

        May share memory with the received message: treat it as read-only (clone to write).
        """
        with trace_span("prefetch.wait", parent=self._span, table=self.table, ready=self._task.done()):
            rows = await self._landed()
        return rows.float() if self._upcast else rows

    async def rows(self) -> torch.Tensor:
        """(*shape, D) rows in request order."""
        if self._rows is None:
            with trace_span("prefetch.wait", parent=self._span, table=self.table, ready=self._task.done()):
                rows = expand(await self._landed(), self._dedup)
            self._rows = rows.float() if self._upcast else rows
        return self._rows

    def __await__(self) -> Generator[Any, None, torch.Tensor]:
        return self.rows().__await__()
