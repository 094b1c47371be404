"""Lookups written to a shard's TCP data plane at issue, before any task exists (a mixin of
`ShardLookups`): a lookup that one shard serves in one data-plane message, with an idle
connection to that shard.

The handle then awaits the connection's own future, which the event loop's read callback
resolves once the rows are in (services/client/dataplane.py): no task, no loop round before the
request leaves. Anything unexpected (an error frame, a broken connection, the deadline) and
the call is taken from the top as a task, the general way (lookups.py), whose retries,
refreshes and fallbacks then apply.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.client.row_paths import RowPaths
from services.client.row_request import LookupCall
from services.client.state import Routing

Landed = tuple[torch.Tensor, int | None]  # ((U, D) rows in the wire dtype, the oldest applied step)


class TcpNow:
    _dtype: int
    _routing: Routing
    row_paths: RowPaths

    if TYPE_CHECKING:

        def _keep_fresh(self) -> None: ...
        def _chunk_rows(self, dim: int) -> int: ...
        def _sole_owner(self, routing: Routing) -> int | None: ...
        @staticmethod
        def _inline_span(t0_ns: int, *, table: int, rows: int, ids: int, row_path: str = "shm") -> Any: ...

    def _direct_shard(self, routing: Routing, n: int, dim: int) -> tuple[int, str] | None:
        """(shard, its gRPC address) when one shard serves these n rows in one data-plane message and
        the TCP data plane is its first path; else None."""
        if routing.holders is not None or n > self._chunk_rows(dim):
            return None
        shard = self._sole_owner(routing)
        address = routing.addresses.get(shard) if shard is not None else None
        if shard is None or not address or not self.row_paths.tcp_first(address, self._dtype):
            return None
        return shard, address

    def _issue_tcp(
        self,
        call: LookupCall,
        ids: np.ndarray,
        *,
        dim: int,
        t0_ns: int,
        num_ids: int,
        general: Callable[[], Coroutine[Any, Any, Landed]],
    ) -> asyncio.Future[Landed] | None:
        """(U,) distinct ids -> the future of their rows, the request already written; None: issue a task.
        `general()`: the lookup the general way (a coroutine), taken when this one fails."""
        self._keep_fresh()
        routing = self._routing
        target = self._direct_shard(routing, ids.size, dim)
        if target is None:
            return None
        shard, address = target
        req = call.rows(ids, dtype=self._dtype, dim=dim, epoch=routing.epoch)
        sent = self.row_paths.tcp_issue(req, shard_id=shard, address=address)
        if sent is None:
            return None
        loop = asyncio.get_running_loop()
        landed: asyncio.Future[Landed] = loop.create_future()
        timer = loop.call_at(call.deadline, sent.cancel)  # past the deadline: drop it, the general way then says so

        def done(f: asyncio.Future) -> None:
            timer.cancel()
            if landed.done():
                return
            if not f.cancelled() and f.exception() is None:
                self.row_paths.used["tcp"] += 1
                self._inline_span(t0_ns, table=call.table, rows=int(ids.size), ids=num_ids, row_path="tcp")
                landed.set_result(f.result())
                return
            _chain(asyncio.ensure_future(general()), landed)  # the general way sees the same failure and handles it

        sent.add_done_callback(done)
        landed.add_done_callback(lambda f: sent.cancel() if f.cancelled() else None)
        return landed


def _chain(task: asyncio.Future[Landed], landed: asyncio.Future[Landed]) -> None:
    """landed <- task's outcome; cancelling landed cancels the task."""

    def copy(t: asyncio.Future[Landed]) -> None:
        if landed.done():
            return
        if t.cancelled():
            landed.cancel()
        elif t.exception() is not None:
            landed.set_exception(t.exception())  # type: ignore[arg-type]
        else:
            landed.set_result(t.result())

    task.add_done_callback(copy)
    landed.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
