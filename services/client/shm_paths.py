"""The shared-memory half of a client's row paths (a mixin of `RowPaths`): the shards' table
files mapped here, read on the calling thread (`read_now`) or as a call (`_shm`), with the
reads counted by the client since they never reach a shard.

A read that cannot be served at once (no file for that shard or table, a retired file, a
slot map ahead of the file's, a busy writer) is a `Miss`; the caller then takes another path.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from services.client.errors import Code, RetryPolicy, ShardError
from services.client.peers import Peer
from services.client.row_request import RowRequest
from services.client.shm_reader import Miss, ShmTableReader, ShmUnavailable
from services.wire import ITEMSIZE, TORCH_DTYPES

INLINE_SHM_BYTES = 1 << 20  # smaller shared-memory gathers run on the loop; larger ones in a thread


@dataclass(slots=True)
class ShmReads:
    """This client's shared-memory reads: they never reach a shard, so the client counts them
    (the shard's Stats count the TCP and gRPC lookups it served)."""

    lookups: int = 0
    rows: int = 0
    max_staleness_seen: int = 0  # over training reads (step > 0): steps of updates the rows missed


class ShmPaths:
    """Reads from shared memory; needs RowPaths' state (below) and its `_fallback`."""

    mode: str
    shm_dir: str
    retry: RetryPolicy
    used: dict[str, int]
    shm_reads: ShmReads
    _peers: dict[str, Peer]
    _count_lock: threading.Lock

    if TYPE_CHECKING:

        def _fallback(self, what: str, peer: Peer, *, address: str, reason: str) -> None: ...

    def read_now(self, req: RowRequest, *, address: str, rows: np.ndarray, open_files: bool = True) -> int | None:
        """rows (n,) opaque rows of D values in the request's dtype <- the rows of its ids (n,) from
        shared memory, on the calling thread -> applied step.

        None when the rows need more than one read (no shared memory for that shard, a file to
        open and `open_files` is off, any `Miss`): `lookup()` then takes the call from the top.
        Only reads state, so a thread other than the client's loop may call it with
        `open_files=False` (readers are opened on the loop).
        """
        if self.mode not in ("auto", "shm"):
            return None
        peer = self._peers.get(address)
        if peer is None or peer.shm_off:
            return None
        reader = peer.readers.get(req.table)
        if reader is None or reader.retired:
            if not open_files:
                return None
            reader = self._reader(peer, address, table=req.table, dim=req.dim)
            if reader is None:
                return None
        got = reader.read(
            req.ids,
            rows=rows,
            dtype=TORCH_DTYPES[req.dtype],
            epoch=req.epoch,
            step=req.step,
            max_staleness=req.max_staleness,
        )
        if isinstance(got, Miss):
            return None
        self.count_shm(req.ids.size, req.step, got)
        return got

    def open_readers(
        self, addresses: dict[int, str], shards: tuple[int, ...], table: int
    ) -> dict[int, ShmTableReader] | None:
        """{shard: its open, unretired file of `table`} for every one of `shards`, or None if one has none
        (nothing is opened here: any thread may ask)."""
        if self.mode not in ("auto", "shm"):
            return None
        out = {}
        for shard in shards:
            peer = self._peers.get(addresses.get(shard, ""))
            if peer is None or peer.shm_off:
                return None
            reader = peer.readers.get(table)
            if reader is None or reader.retired:
                return None
            out[shard] = reader
        return out

    def count_shm(self, rows: int, step: int, applied: int, *, shards: int = 1) -> None:
        """`rows` read from `shards` shards' files (a read per shard, as the shards count their lookups)."""
        with self._count_lock:
            self.used["shm"] += shards
            r = self.shm_reads
            r.lookups += shards
            r.rows += int(rows)
            if step:
                r.max_staleness_seen = max(r.max_staleness_seen, step - 1 - applied)

    def _reader(self, peer: Peer, address: str, *, table: int, dim: int) -> ShmTableReader | None:
        reader = peer.readers.get(table)
        if reader is not None and not reader.retired:
            return reader
        name = peer.shm_files.get(table)
        if name is None:
            self._fallback("shm", peer, address=address, reason=f"table {table} is not in shared memory")
            return None
        try:
            reader = peer.readers[table] = ShmTableReader(os.path.join(self.shm_dir, name), token=peer.token, dim=dim)
        except ShmUnavailable as exc:
            self._fallback("shm", peer, address=address, reason=str(exc))
            return None
        return reader

    async def _shm(
        self, peer: Peer, address: str, req: RowRequest, *, deadline: float
    ) -> tuple[torch.Tensor, int] | None:
        loop = asyncio.get_running_loop()
        ids = req.ids
        out = torch.empty((ids.size, req.dim), dtype=TORCH_DTYPES[req.dtype])  # (n, D)
        big = ids.size * req.dim * ITEMSIZE[req.dtype] > INLINE_SHM_BYTES
        attempt = 0
        for _ in range(3):  # a retired file is reopened at most twice per call
            reader = self._reader(peer, address, table=req.table, dim=req.dim)
            if reader is None:
                return None
            read = functools.partial(
                reader.read, ids, out, epoch=req.epoch, step=req.step, max_staleness=req.max_staleness
            )
            while True:
                got = await loop.run_in_executor(None, read) if big else read()
                if not isinstance(got, Miss):
                    return out, got
                if got.reason != "stale":
                    break
                attempt += 1  # training read ahead of the updates it needs: wait for them, like the shard does
                delay = self.retry.backoff(min(attempt, 4))
                if loop.time() + delay >= deadline:
                    raise ShardError(
                        Code.DEADLINE_EXCEEDED,
                        f"rows of table {req.table} for step {req.step} still miss "
                        f"{req.step - 1 - got.applied_step} steps of updates (staleness bound "
                        f"{req.max_staleness})",
                        address=address,
                        call="Lookup (shm)",
                    )
                await asyncio.sleep(delay)
            if got.reason == "retired":
                peer.readers.pop(req.table, None)
                continue
            if got.reason == "epoch" and got.epoch > req.epoch:
                raise ShardError(
                    Code.FAILED_PRECONDITION,
                    f"stale slot-map epoch {req.epoch} (shard is at {got.epoch}): refresh the slot map",
                    address=address,
                    call="Lookup (shm)",
                )
            return None  # not yet at this epoch, rows moved, or a busy writer: the gRPC path sorts it out
        return None
