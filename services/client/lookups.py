"""`ShardLookups`: the lookup half of `ShardClient` (a mixin; client.py holds the routing and the calls).

Phases of a lookup (all on the caller's event loop; the numpy work is O(N) vectorised):
  1. dedup (routing.dedup), 2. split unique ids by slot owner, 3. cut each shard's ids into
  messages under the size limit, 4. one Lookup per message, all concurrent, under one
  deadline, 5. rows land in (U, D) at their positions, 6. `await handle` expands by inverse.
A small lookup (<= 1 MiB of rows) whose shards are all mapped from shared memory skips 3-5:
`lookup()` reads the rows in place right away and returns a finished handle (no task).
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.client.base import ClientBase
from services.client.codec import encode_lookup_request
from services.client.dataplane import DataPlaneDown
from services.client.errors import Code, ShardError
from services.client.handle import LookupHandle
from services.client.replicas import SWITCH_CODES, alternate_owners
from services.client.routing import (
    Chunk,
    Dedup,
    Group,
    as_id_array,
    assemble,
    check_range,
    chunk_groups,
    dedup,
    max_rows_per_message,
    slot_of,
    split_by_owner,
)
from services.client.row_paths import RowPaths
from services.client.row_request import LookupCall
from services.client.shm_now import ShmNow
from services.client.state import Routing, gather_or_cancel
from services.client.tcp_now import TcpNow
from services.telemetry import traced_task
from services.wire import row_bytes, row_cols


class ShardLookups(TcpNow, ShmNow, ClientBase):
    """Lookups by any row path; needs the attributes below (and ClientBase's) from `ShardClient`."""

    _dtype: int
    _torch_dtype: torch.dtype
    chunk_bytes: int
    replica_switches: int
    row_paths: RowPaths

    if TYPE_CHECKING:

        def _keep_fresh(self) -> None: ...

    def lookup(
        self,
        table: int,
        row_ids: np.ndarray | torch.Tensor,
        *,
        upcast: bool = False,
        timeout_s: float | None = None,
        dedup_ids: bool = True,
        step: int = 0,
        max_staleness: int = 0,
    ) -> LookupHandle:
        """Issue a lookup of any-shape int ids now -> handle; `await handle` -> (*shape, D).

        `dedup_ids=False` skips the duplicate check (ids already distinct, e.g. the worker's
        unique ids); duplicates are still answered correctly, each sent once per occurrence.
        Training lookups pass the 1-based `step` they are for: a shard that has applied fewer
        than `step - 1 - max_staleness` steps refuses (UNAVAILABLE, retried until the deadline).
        `handle.applied_step` is then the oldest applied step among the shards that answered.
        """
        if step < 0 or max_staleness < 0:
            raise ValueError(f"step {step} / max_staleness {max_staleness}: must be >= 0")
        layout = self.layout(table)
        flat, shape = as_id_array(row_ids)  # (N,)
        check_range(flat, layout.num_rows, table)
        d = dedup(flat, shape) if dedup_ids else Dedup(unique=flat, inverse=None, shape=shape)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("ShardClient.lookup must be called from a running event loop") from None
        t0 = time.time_ns()
        now = self._read_now(table, d.unique, step=step, max_staleness=max_staleness)
        if now is not None:  # read in place already: a finished handle, no task, no loop round
            landed = loop.create_future()
            landed.set_result(now)
            span = self._inline_span(t0, table=table, rows=int(d.unique.size), ids=int(flat.size))
            return LookupHandle(table=table, dedup=d, task=landed, upcast=upcast, span=span, dim=layout.dim)
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)

        call = LookupCall(table, deadline, self.retry.max_refreshes, step, max_staleness)

        def general(direct: bool = False) -> Coroutine[Any, Any, tuple[torch.Tensor, int | None]]:
            """The lookup as a coroutine: routed, chunked, retried, refreshed, falling back."""
            return self._gather(call, d.unique, direct=direct)

        sent = self._issue_tcp(  # written to the data plane already: the connection's future, no task
            call, d.unique, dim=layout.dim, t0_ns=t0, num_ids=int(flat.size), general=general
        )
        if sent is not None:
            return LookupHandle(
                table=table, dedup=d, task=sent, upcast=upcast, dim=layout.dim, fp8=self.wire_dtype == "fp8"
            )
        task, span = traced_task(  # span "lookup": issue -> rows landed; the per-shard RPC spans are its children
            general(direct=True),
            "lookup",
            table=table,
            rows=int(d.unique.size),
            ids=int(flat.size),
            epoch=self._routing.epoch,
            unique_ratio=round(d.unique.size / max(1, flat.size), 4),
        )
        return LookupHandle(
            table=table, dedup=d, task=task, upcast=upcast, span=span, dim=layout.dim, fp8=self.wire_dtype == "fp8"
        )

    def _chunk_rows(self, dim: int) -> int:
        width = row_bytes(self._dtype, dim)
        limit = max_rows_per_message(dim=width, itemsize=1, max_message_bytes=self.max_message_bytes)
        return max(1, min(limit, self.chunk_bytes // width))

    async def _gather(
        self, call: LookupCall, ids: np.ndarray, *, direct: bool = False
    ) -> tuple[torch.Tensor, int | None]:
        """(n,) distinct ids -> ((n, D) rows in the wire dtype in the order of `ids` (fp8: (n, D + D/32)
        bytes, dequantised by the handle), oldest applied_step of the shards asked, None if none was).

        `direct`: a lookup that one shard serves in one data-plane message is first sent as just
        that (no chunking, reassembly or retry layers: they cost more than the request on a 1K-row
        lookup); anything unexpected and it is taken from the top, the general way."""
        dim = self.layouts[call.table].dim
        self._keep_fresh()
        routing = self._routing
        target = self._direct_shard(routing, ids.size, dim) if direct else None
        if target is not None:
            shard, address = target
            try:
                req = call.rows(ids, dtype=self._dtype, dim=dim, epoch=routing.epoch)
                return await self.row_paths.tcp_once(req, shard_id=shard, address=address, deadline=call.deadline)
            except (ShardError, DataPlaneDown, TimeoutError):
                pass  # the general way below sees the same failure and handles it (retry, refresh, fallback)
        sole, shards = self._owners(routing)
        chunks = chunk_groups(split_by_owner(ids, routing.owners, sole=sole, shards=shards), self._chunk_rows(dim))
        return await self._fan_out(call, ids.size, chunks, routing=routing)

    async def _fan_out(
        self,
        call: LookupCall,
        num_ids: int,
        groups: Sequence[Group | Chunk],
        *,
        routing: Routing,
        tried: frozenset[int] = frozenset(),
    ) -> tuple[torch.Tensor, int | None]:
        """Groups of ids by holder -> ((U, D) rows in the ids' order, the oldest applied step), all at once."""
        parts = await gather_or_cancel(
            [self._lookup_chunk(call, shard_id=g.shard, ids=g.ids, routing=routing, tried=tried) for g in groups]
        )
        applied = min((a for _, a in parts if a is not None), default=None)
        placed = [(slice(0, num_ids) if g.positions is None else g.positions, p) for g, (p, _) in zip(groups, parts)]
        cols = row_cols(self._dtype, self.layouts[call.table].dim)  # fp8: D + D/32 bytes a row
        return assemble(num_ids, cols, self._torch_dtype, parts=placed), applied

    async def _lookup_chunk(
        self,
        call: LookupCall,
        *,
        shard_id: int,
        ids: np.ndarray,
        routing: Routing,
        tried: frozenset[int] = frozenset(),
    ) -> tuple[torch.Tensor, int | None]:
        """-> ((n, D) rows, the applied step): from `shard_id`, or, with replicas, from the next holder of
        the slots when it fails or does not answer in cluster.replica_switch_s (services/client/replicas.py)."""
        if routing.holders is None:
            return await self._lookup_on(call, shard_id=shard_id, ids=ids, routing=routing)
        loop = asyncio.get_running_loop()
        tried = tried | {shard_id}
        alt = alternate_owners(routing.holders, set(tried))  # (S,) next holder per slot, -1 if none left
        alt_of_ids = alt[slot_of(ids, alt.shape[0])]  # (n,)
        can_switch = bool(ids.size) and bool((alt_of_ids >= 0).all())
        budget = min(call.deadline - loop.time(), self.cfg.cluster.replica_switch_s)
        try:
            return await asyncio.wait_for(  # no retries here: the next holder is the retry
                self._lookup_on(call, shard_id=shard_id, ids=ids, routing=routing, retry=False), budget
            )
        except TimeoutError:
            err = ShardError(
                Code.DEADLINE_EXCEEDED,
                f"no answer in {budget:.2f} s (cluster.replica_switch_s)",
                address=routing.addresses.get(shard_id, ""),
                shard_id=shard_id,
                call="Lookup",
            )
        except ShardError as exc:
            err = exc
        if err.code not in SWITCH_CODES or loop.time() >= call.deadline:
            raise err
        if not can_switch:
            # no other holder in this map: a newer one may list one (failover, repair); else keep waiting here
            try:
                moved = call.refreshes > 0 and await self._newer_than(routing.epoch)
            except Exception:  # noqa: BLE001 - the control plane is down: this shard is all we know
                moved = False
            if moved:
                return await self._gather(call.refreshed(), ids)
            return await self._lookup_on(call, shard_id=shard_id, ids=ids, routing=routing)
        self.replica_switches += 1
        return await self._fan_out(call, ids.size, split_by_owner(ids, alt), routing=routing, tried=tried)

    async def _lookup_on(
        self, call: LookupCall, *, shard_id: int, ids: np.ndarray, routing: Routing, retry: bool = True
    ) -> tuple[torch.Tensor, int | None]:
        """-> ((n, D) rows, the shard's applied step): shared memory, TCP data plane or gRPC (row_paths.py)."""
        dim = self.layouts[call.table].dim
        req = call.rows(ids, dtype=self._dtype, dim=dim, epoch=routing.epoch)
        try:
            address = routing.addresses.get(shard_id)
            fast = (
                None
                if not address
                else await self.row_paths.lookup(req, shard_id=shard_id, address=address, deadline=call.deadline)
            )
            if fast is not None:
                return fast
            self.row_paths.used["grpc"] += 1
            request = encode_lookup_request(
                table=req.table,
                epoch=req.epoch,
                row_ids=ids,
                dtype=req.dtype,
                step=req.step,
                max_staleness=req.max_staleness,
            )
            reply = await self._call(
                shard_id,
                "Lookup",
                lambda ep, t: ep.lookup_raw(request, timeout=t),
                routing=routing,
                deadline=call.deadline,
                idempotent=retry,
            )
        except ShardError as err:
            if err.code == Code.FAILED_PRECONDITION and call.refreshes > 0 and await self._newer_than(routing.epoch):
                return await self._gather(call.refreshed(), ids)
            raise
        n = ids.size
        if reply.dtype != self._dtype or reply.dim != dim or len(reply.rows) != n * row_bytes(self._dtype, dim):
            raise ShardError(
                Code.INTERNAL,
                f"malformed reply: {len(reply.rows)} bytes, dim {reply.dim}, dtype {reply.dtype} for {n} rows of "
                f"{dim} dims in dtype {self._dtype}",
                address=routing.addresses.get(shard_id, ""),
                shard_id=shard_id,
                call="Lookup",
            )
        with warnings.catch_warnings():  # the buffer is the received message, owned by this tensor alone
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.frombuffer(reply.rows, dtype=self._torch_dtype)
            return rows.view(n, row_cols(self._dtype, dim)), reply.applied_step  # (n, D); fp8: (n, D + D/32)
