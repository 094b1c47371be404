"""What a lookup carries down the client's layers: `LookupCall`, one lookup's terms (table,
deadline, refreshes left, step, staleness bound) through routing, chunks, replicas and retries
(lookups.py); `RowRequest`, one shard's share of it, as every row path (shared memory, the TCP
data plane, the gRPC Lookup) is asked it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class RowRequest:
    table: int
    ids: np.ndarray  # (n,) int64 row ids, checked in range
    dtype: int  # the wire dtype's code (services/wire.py)
    dim: int  # values per row D
    epoch: int  # the slot map the ids were routed by
    step: int = 0  # training: the 1-based step the rows are for (0: not training)
    max_staleness: int = 0  # steps of updates the rows may miss (with `step`)


@dataclass(frozen=True, slots=True)
class LookupCall:
    """One client lookup's terms, the same at every layer it passes (routing, chunks, replicas, retries)."""

    table: int
    deadline: float  # on the client's loop clock
    refreshes: int  # slot-map refreshes this call may still take
    step: int = 0
    max_staleness: int = 0

    def refreshed(self) -> LookupCall:
        """The same call after one slot-map refresh."""
        return LookupCall(self.table, self.deadline, self.refreshes - 1, self.step, self.max_staleness)

    def rows(self, ids: np.ndarray, *, dtype: int, dim: int, epoch: int) -> RowRequest:
        """What one shard is asked for `ids` of this call."""
        return RowRequest(self.table, ids, dtype, dim, epoch, self.step, self.max_staleness)
