"""Slot migration between live shards: chunking on the sender, staging on the receiver.

Protocol (driven by the rebalancer, e.g. `engram cluster rebalance`):

1. `MigrateSlots(slots, target, epoch)` on the source: the source *freezes* the slots
   (updates touching them get UNAVAILABLE; lookups go on), then streams every (table, slot)
   to the target's `ImportSlots` as SlotChunk messages of at most `chunk_bytes`.
2. The target stages complete slots (verified sizes, in-order offsets); staged slots are not
   served.
3. The rebalancer writes the new slot map (epoch + 1) to the control plane and sends
   `SetSlotMap(epoch + 1, owned_slots)` to every shard: the target swaps the staged slots
   in, the source drops the slots it no longer owns, and frozen slots thaw.

A failed stream unfreezes the source's slots and leaves nothing half-staged on the target.
While a shard imports or holds staged slots it takes no update (UNAVAILABLE, retried by the
client): a client must not count it done with a step its copies lack. A copy older than a step
the receiving shard already applied is refused for the same reason (the migration is retried).
Leases (cluster.freeze_lease_s): a freeze lifts that long after its stream ended, and staged
slots are dropped that long after they arrived, when no SetSlotMap came; the source then
refuses a slot map that gives the slot away until it is migrated again (updates may have
reached it after the copy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

from engram.layout import slot_num_rows
from engram.row_format import row_nbytes
from proto.shard.v1 import shard_pb2
from services.shard import row_store_format as fmts
from services.shard.errors import Reason, invalid, precondition
from services.shard.memory import alloc_state, state_floats_per_row
from services.shard.store import ShardStore, SlotData


def slot_chunks(
    store: ShardStore, *, table: int, slot: int, epoch: int, chunk_bytes: int
) -> Iterator[shard_pb2.SlotChunk]:
    """SlotChunks of one owned (table, slot); each message carries about `chunk_bytes` of floats."""
    block = store.slot_block(table, slot)
    n, dim = block.weights.shape[0], store.layouts[table].dim
    per_row = _state_bytes_per_row(store, dim) + row_nbytes(store.row_format, dim)
    step = max(1, chunk_bytes // per_row)
    for a in range(0, max(n, 1), step):
        b = min(n, a + step)
        state = b"".join(s[a:b].numpy().tobytes() for s in block.state)  # adam: m then v; adagrad: acc
        weights = block.weights[a:b].contiguous().view(torch.uint8).numpy().tobytes()  # the storage format's bytes
        yield shard_pb2.SlotChunk(
            table=table,
            slot=slot,
            epoch=epoch,
            weights=weights,
            state=state,
            applied_step=block.applied_step,
            last=b >= n,
            offset_rows=a,
        )


def _state_bytes_per_row(store: ShardStore, dim: int) -> int:
    return 0 if fmts.read_only(store.row_format) else 4 * state_floats_per_row(store.kind, dim)


_FINITE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fp8 rows: not checked


def _check_values(chunk: shard_pb2.SlotChunk, *, rows: int, dim: int, kind: str, fmt: str) -> None:
    """Rows and optimizer state a shard would serve and train: finite, and second moments >= 0."""
    where = f"table {chunk.table} slot {chunk.slot} at row {chunk.offset_rows}"
    if (
        rows
        and fmt in _FINITE_DTYPES
        and not bool(torch.isfinite(torch.frombuffer(bytearray(chunk.weights), dtype=_FINITE_DTYPES[fmt])).all())
    ):
        raise invalid(f"weights: non-finite values (NaN/Inf) in the chunk of {where}; slot not imported")
    state = np.frombuffer(chunk.state, dtype="<f4")
    if rows and not np.isfinite(state).all():
        raise invalid(f"state: non-finite values (NaN/Inf) in the chunk of {where}; slot not imported")
    moments = state[rows * dim :] if kind == "adam" else state  # adam: m then v; adagrad: the accumulator
    if rows and (moments < 0).any():
        raise invalid(
            f"state: negative {'second moments' if kind == 'adam' else 'accumulators'} in the chunk of "
            f"{where}; slot not imported"
        )


class Staging:
    """Slots received from peers, complete or in progress, keyed by (table, slot)."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.complete: dict[tuple[int, int], SlotData] = {}
        self.staged_at: dict[tuple[int, int], float] = {}  # time.monotonic() a slot became complete
        self._partial: dict[tuple[int, int], tuple[SlotData, int]] = {}  # -> (block, rows received)

    def add(self, chunk: shard_pb2.SlotChunk) -> bool:
        """Copy one chunk into its staged slot -> True when the slot is complete.

        Every check runs before the copy; a bad chunk raises and its slot's partial data is dropped.
        """
        key = (chunk.table, chunk.slot)
        try:
            return self._add(chunk, key)
        except Exception:
            self._partial.pop(key, None)
            raise

    def _add(self, chunk: shard_pb2.SlotChunk, key: tuple[int, int]) -> bool:
        store = self.store
        view = store.view
        store.check_epoch(view, chunk.epoch)
        layout, _ = store.table(view, chunk.table)
        if not 0 <= chunk.slot < store.num_slots:
            raise invalid(f"slot {chunk.slot} is outside 0..{store.num_slots - 1}")
        if chunk.slot in view.owned:
            raise precondition(
                f"slot {chunk.slot} is already served by shard {store.shard_id}; not importing it",
                Reason.MIGRATION_REFUSED,
            )
        dim, total = layout.dim, slot_num_rows(layout.num_rows, chunk.slot, store.num_slots)
        fmt, width = store.row_format, row_nbytes(store.row_format, dim)
        if len(chunk.weights) % width:
            raise invalid(f"weights: {len(chunk.weights)} bytes is not a whole number of {dim}-dim {fmt} rows")
        rows = len(chunk.weights) // width
        want_state = rows * _state_bytes_per_row(store, dim)
        if len(chunk.state) != want_state:
            kind = "no state: the table is read-only" if fmts.read_only(fmt) else f"{store.kind} state"
            raise invalid(f"state: {len(chunk.state)} bytes for {rows} rows, expected {want_state} ({kind})")
        _check_values(chunk, rows=rows, dim=dim, kind=store.kind, fmt=fmt)
        if chunk.offset_rows == 0 and chunk.applied_step < store.head_step(chunk.table):
            raise precondition(
                f"table {chunk.table} slot {chunk.slot}: the copy holds step {chunk.applied_step}, behind step "
                f"{store.head_step(chunk.table)} that shard {store.shard_id} already applied to its slots (a client "
                "counted this shard done with steps the copy lacks); retry the migration",
                Reason.MIGRATION_BEHIND,
            )
        if chunk.offset_rows == 0:
            block = SlotData(
                weights=torch.empty((total, fmts.storage_cols(fmt, dim)), dtype=fmts.STORAGE_DTYPES[fmt]),
                state=() if fmts.read_only(fmt) else alloc_state(store.kind, total, dim),
                applied_step=chunk.applied_step,
            )
            self._partial[key] = (block, 0)
            self.complete.pop(key, None)
        if key not in self._partial:
            raise precondition(
                f"table {chunk.table} slot {chunk.slot}: chunk at row {chunk.offset_rows} without a start",
                Reason.MIGRATION_REFUSED,
            )
        block, received = self._partial[key]
        if chunk.offset_rows != received or received + rows > total:
            raise invalid(
                f"table {chunk.table} slot {chunk.slot}: chunk of {rows} rows at row {chunk.offset_rows}, "
                f"expected row {received} of {total}"
            )
        a, b = received, received + rows
        if rows:
            raw = torch.frombuffer(chunk.weights, dtype=torch.uint8).view(rows, width)  # (rows, bytes per row)
            block.weights[a:b].view(torch.uint8).copy_(raw)
        flat = torch.frombuffer(chunk.state, dtype=torch.float32) if chunk.state else torch.empty(0)
        offset = 0
        for s in block.state:
            width = s[a:b].numel()
            s[a:b] = flat[offset : offset + width].view_as(s[a:b])
            offset += width
        received = b
        if chunk.last:
            del self._partial[key]
            if received != total:
                raise invalid(f"table {chunk.table} slot {chunk.slot}: stream ended at row {received} of {total}")
            self.complete[key] = block
            self.staged_at[key] = time.monotonic()
            return True
        self._partial[key] = (block, received)
        return False

    def busy(self) -> bool:
        """Slots are being received or wait for their slot map (the shard takes no update meanwhile)."""
        return bool(self.complete or self._partial)

    def partial_keys(self) -> list[tuple[int, int]]:
        return list(self._partial)

    def drop_partial(self) -> None:
        self._partial.clear()

    def clear(self) -> None:
        self.complete.clear()
        self.staged_at.clear()
        self._partial.clear()

    def expire(self, lease_s: float) -> int:
        """Drop complete slots no slot map claimed within `lease_s` -> how many were dropped."""
        now = time.monotonic()
        old = [k for k, t in self.staged_at.items() if now - t > lease_s]
        for k in old:
            self.complete.pop(k, None)
            self.staged_at.pop(k, None)
        return len(old)
