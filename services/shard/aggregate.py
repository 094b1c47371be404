"""Sync-mode aggregation: the parts of one optimizer step, summed and applied once.

A step with `num_parts > 1` is applied when its last part arrives: the union of the parts'
rows, with the gradients of rows present in several parts summed (parts in part_id order,
so the sum is deterministic). Until then the step is *pending* for its table.

Rules (per table; the engine holds the table's update lock around every call):
- parts of the pending step must agree on num_parts and optimizer version; a part_id sent
  twice is FAILED_PRECONDITION (the first one counts);
- a part of a *later* step waits (in the engine, without the lock) until the pending step
  is applied, bounded by the engine's `pending_wait_s` (then ABORTED); a part of an
  *earlier* step that is not yet applied is FAILED_PRECONDITION (it arrived too late);
- each part is fully validated on arrival, so a bad part is refused alone and the pending
  step is not disturbed;
- a step still missing parts `pending_step_timeout_s` after its first part arrived is
  discarded whole (`expire`): its parts are dropped, nothing is applied, waiters wake up, and
  the engine counts it (`steps_discarded`). The trainer then sees the step refused and fails
  loudly instead of the shard refusing checkpoints and slot changes forever.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from services.shard.errors import Reason, invalid, precondition
from services.shard.store import Update


@dataclass(slots=True)
class PendingStep:
    table: int
    step: int
    num_parts: int
    version: int
    parts: dict[str, Update] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once applied (or abandoned)
    started: float = field(default_factory=time.monotonic)
    nbytes: int = 0  # gradient bytes held by the parts (counted in the engine's in-flight budget)


def merge_parts(parts: list[Update]) -> Update:
    """Union of rows, gradients of shared rows summed; parts in the given order."""
    first = parts[0]
    ids = np.concatenate([p.rows for p in parts])  # (N,) int64
    grads = torch.cat([p.grads for p in parts])  # (N, D)
    uniq, inv = np.unique(ids, return_inverse=True)
    summed = torch.zeros((uniq.size, grads.shape[1]), dtype=torch.float32)  # (U, D)
    summed.index_add_(0, torch.from_numpy(inv.astype(np.int64)), grads)
    return Update(table=first.table, rows=uniq, grads=summed, step=first.step, params=parts[-1].params)


class StepAggregator:
    def __init__(self) -> None:
        self._pending: dict[int, PendingStep] = {}

    def pending(self, table: int) -> PendingStep | None:
        return self._pending.get(table)

    def any_pending(self) -> list[PendingStep]:
        return list(self._pending.values())

    def add(self, upd: Update, *, part_id: str, num_parts: int, version: int) -> Update | None:
        """Record one validated part -> the merged update once every part is in, else None."""
        if not part_id:
            raise invalid(f"part_id: required when num_parts={num_parts} > 1 (step {upd.step}, table {upd.table})")
        pend = self._pending.get(upd.table)
        if pend is None:
            pend = self._pending[upd.table] = PendingStep(upd.table, upd.step, num_parts, version)
        elif pend.step != upd.step:
            raise precondition(
                f"table {upd.table}: step {pend.step} is pending, not step {upd.step}", Reason.COLLECTING_PARTS
            )
        if num_parts != pend.num_parts:
            raise invalid(
                f"num_parts: {num_parts} for part {part_id!r}, but step {pend.step} of table {upd.table} "
                f"was started with {pend.num_parts} parts"
            )
        if version != pend.version:
            raise invalid(
                f"optimizer.version: {version} for part {part_id!r}, but step {pend.step} of table "
                f"{upd.table} was started with version {pend.version}"
            )
        if part_id in pend.parts:
            raise precondition(
                f"part {part_id!r} of step {pend.step} (table {upd.table}) was already received "
                f"({len(pend.parts)} of {pend.num_parts} parts in)",
                Reason.PART_ALREADY_RECEIVED,
            )
        pend.parts[part_id] = upd
        pend.nbytes += upd.grads.nbytes + upd.rows.nbytes
        if len(pend.parts) < pend.num_parts:
            return None
        return merge_parts([pend.parts[k] for k in sorted(pend.parts)])

    def finish(self, table: int) -> PendingStep | None:
        """The pending step of `table` was applied (or discarded): wake the parts of later steps waiting on it."""
        pend = self._pending.pop(table, None)
        if pend is not None:
            pend.done.set()
        return pend

    def expired(self, timeout_s: float) -> list[int]:
        """Tables whose pending step has waited more than `timeout_s` for its missing parts."""
        now = time.monotonic()
        return [t for t, p in self._pending.items() if now - p.started > timeout_s]
