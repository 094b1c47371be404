"""The shard's request handling on the event loop: locks, the worker pool, aggregation, admin.

Here: lookups, updates (multi-part steps), expiry, stats. Checkpoints and restores are in
engine_ckpt.py, migration and slot maps in engine_slots.py (mixins of `ShardEngine`).

Concurrency model:
- every table touch runs in a ThreadPoolExecutor (torch gathers/updates release the GIL), so
  the event loop only parses, dispatches and replies; tiny lookups run inline;
- lookups take no lock and run concurrently with everything;
- updates of one table are serialised by that table's asyncio.Lock; the lock is held until
  the worker thread has finished, even if the caller goes away (no update ever overlaps
  another, and a cancelled call's update is either fully applied or not started);
- admin operations (checkpoint, restore, migration, slot map) are serialised by one admin lock
  and take the table locks they need, always in table order.

Bounds (cluster.* in engram/config.py; see services/shard/limits.py): a step may advance a
table's applied_step by at most `max_step_jump`, a slot map its epoch by `max_epoch_jump`;
a multi-part step has at most `max_step_parts` parts and is discarded after
`pending_step_timeout_s`; migration freezes and staged imports lift after `freeze_lease_s`;
requests in flight (and pending parts) hold at most `inflight_mb`. `housekeeping()` expires
what nobody comes back for.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import psutil

from engram.config import ClusterConfig
from proto.shard.v1 import shard_pb2
from services.shard.aggregate import StepAggregator
from services.shard.engine_ckpt import CheckpointOps
from services.shard.engine_slots import SlotMapOps
from services.shard.errors import Code, Reason, ShardError, invalid, precondition, unavailable
from services.shard.gather import LookupResult
from services.shard.limits import InflightBudget
from services.shard.memory import Trimmer
from services.shard.migrate import Staging
from services.shard.store import ShardStore
from services.telemetry import record_shard_event
from services.wire import row_bytes

T = TypeVar("T")
INLINE_LOOKUP_ROWS = 256  # smaller lookups skip the thread hop
log = logging.getLogger("engram.shard")


class ShardEngine(CheckpointOps, SlotMapOps):
    def __init__(
        self,
        store: ShardStore,
        *,
        pool: ThreadPoolExecutor,
        max_message_bytes: int,
        address: str = "",
        pending_wait_s: float = 60.0,
        limits: ClusterConfig | None = None,
    ) -> None:
        self.limits = limits = limits or ClusterConfig()
        self.store = store
        self.pool = pool
        self.address = address
        # (target, options) -> a grpc.aio channel to a peer shard (the server sets the secure one)
        self.dial: Callable[[str, list], Any] = lambda target, options: grpc.aio.insecure_channel(
            target, options=options
        )
        self.pending_wait_s = pending_wait_s
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = max(64 << 10, min(4 << 20, max_message_bytes // 4))
        self.locks = {t: asyncio.Lock() for t in store.layouts}
        self.admin = asyncio.Lock()
        self.import_lock = asyncio.Lock()
        self.importing = False  # an ImportSlots stream is open: updates wait (migrate.py)
        self.agg = StepAggregator()
        self.staging = Staging(store)
        self.lookups = self.rows_served = self.updates = 0
        self.max_staleness_seen = 0  # over training lookups (LookupRequest.step > 0)
        self.steps_discarded = 0  # multi-part steps dropped after pending_step_timeout_s
        self.budget = InflightBudget(limits.inflight_mb << 20)
        self.trimmer = Trimmer()
        # () -> awaitable SlotMap (the control plane's), so SetSlotMap without `owners` can still
        # name the owner of a row in errors; None when standalone
        self.slot_map_source: Callable[[], Awaitable] | None = None
        # () -> awaitable [ShardRecord] (the control plane's registry): MigrateSlots targets only these
        self.peers_source: Callable[[], Awaitable[list]] | None = None
        self.started = time.time()
        self.row_paths: dict = {}  # the data plane's address and shared files, for the registry (server.py)

    async def _run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run `fn` in the pool; if the caller is cancelled, still wait for the thread to finish."""
        fut = asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))
        cancelled = False
        while True:
            try:
                result = await asyncio.shield(fut)
                break
            except asyncio.CancelledError:
                if fut.done():
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError
        return result

    @contextlib.asynccontextmanager
    async def _all_tables(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for t in sorted(self.locks):
                await stack.enter_async_context(self.locks[t])
                self._expire_pending(t)
            pending = self.agg.any_pending()
            if pending:
                p = pending[0]
                raise precondition(
                    f"step {p.step} of table {p.table} is collecting parts ({len(p.parts)} of {p.num_parts} "
                    "in); retry once it is applied",
                    Reason.COLLECTING_PARTS,
                )
            yield

    # ---------------------------------------------------------------------------------------
    # expiry of what a request left behind

    def _expire_pending(self, table: int) -> None:
        """Discard the pending step of `table` if it waited too long (the caller holds the table's lock)."""
        if table not in self.agg.expired(self.limits.pending_step_timeout_s):
            return
        pend = self.agg.finish(table)
        assert pend is not None
        self.budget.give(pend.nbytes)
        self.steps_discarded += 1
        record_shard_event("step_discarded")
        log.warning(
            "discarded step %d of table %d: %d of %d parts arrived in %.0f s (cluster.pending_step_timeout_s); "
            "nothing of it was applied",
            pend.step,
            table,
            len(pend.parts),
            pend.num_parts,
            self.limits.pending_step_timeout_s,
        )

    async def housekeeping(self, period_s: float = 1.0) -> None:
        """Forever: expire pending steps, freeze leases and staged imports nobody came back for."""
        while True:
            await asyncio.sleep(period_s)
            for t in self.agg.expired(self.limits.pending_step_timeout_s):
                async with self.locks[t]:
                    self._expire_pending(t)
            lifted = self.store.frozen.lifted
            self.store.frozen.active()
            record_shard_event("freeze_lifted", self.store.frozen.lifted - lifted)
            if not self.admin.locked() and not self.import_lock.locked():
                dropped = self.staging.expire(self.limits.freeze_lease_s)
                record_shard_event("staged_dropped", dropped)
                if dropped:
                    log.warning(
                        "dropped %d staged slot imports no slot map claimed in %.0f s",
                        dropped,
                        self.limits.freeze_lease_s,
                    )

    # ---------------------------------------------------------------------------------------
    # lookups and updates

    async def lookup(self, req: shard_pb2.LookupRequest) -> LookupResult:
        """-> the serialized LookupResponse (the servicer sends it as is) and its numbers."""
        row_ids = req.row_ids  # each attribute access copies the field
        kw: dict[str, Any] = dict(
            table=req.table,
            epoch=req.epoch,
            row_ids=row_ids,
            dtype=req.dtype,
            step=req.step,
            max_staleness=req.max_staleness,
        )
        if len(row_ids) <= 8 * INLINE_LOOKUP_ROWS:
            result = self.store.lookup(**kw)
        else:
            self.store.check_reply_size(req.table, len(row_ids), req.dtype)
            dim = self.store.layouts[req.table].dim if req.table in self.store.layouts else 0
            need = len(row_ids) + len(row_ids) // 8 * (row_bytes(req.dtype, dim) or 4 * dim)  # ids + reply
            with self.budget.hold(need, f"a lookup of {len(row_ids) // 8} rows"):
                result = await self._run(self.store.lookup, **kw)
        self.lookups += 1
        self.rows_served += result.rows
        if req.step:  # training lookups: the staleness actually served (the store refused beyond the bound)
            self.max_staleness_seen = max(self.max_staleness_seen, max(0, req.step - 1 - result.applied_step))
        self.trimmer.note(len(result.payload))
        return result

    async def apply_gradients(self, req: shard_pb2.ApplyGradientsRequest) -> shard_pb2.ApplyGradientsResponse:
        store, t = self.store, req.table
        store.check_epoch(store.view, req.epoch)
        store.table(store.view, t)
        if req.num_parts > self.limits.max_step_parts:
            raise invalid(f"num_parts: {req.num_parts} is over cluster.max_step_parts={self.limits.max_step_parts}")
        with self.budget.hold(3 * (len(req.row_ids) + len(req.grads)), f"a gradient of {len(req.grads)} bytes"):
            return await self._apply_waiting(req)

    async def _apply_waiting(self, req: shard_pb2.ApplyGradientsRequest) -> shard_pb2.ApplyGradientsResponse:
        store, t = self.store, req.table
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.pending_wait_s
        while True:
            async with self.locks[t]:
                self._expire_pending(t)
                pend = self.agg.pending(t)
                if pend is None or req.step == pend.step or req.step <= store.applied_step[t]:
                    return await self._apply_locked(req)
                if req.step < pend.step:
                    raise precondition(
                        f"step {req.step} of table {t} arrived while step {pend.step} is collecting parts: too late",
                        Reason.STEP_TOO_LATE,
                    )
                done, waiting_for, got, need = pend.done, pend.step, len(pend.parts), pend.num_parts
            try:
                await asyncio.wait_for(done.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ShardError(
                    Code.ABORTED,
                    f"step {req.step} of table {t} waited {self.pending_wait_s:g} s for step {waiting_for} to "
                    f"collect its parts ({got} of {need} received); send the missing parts first",
                    reason=Reason.PARTS_TIMEOUT,
                ) from None

    async def _apply_locked(self, req: shard_pb2.ApplyGradientsRequest) -> shard_pb2.ApplyGradientsResponse:
        store, t, opt = self.store, req.table, req.optimizer
        upd = await self._run(
            store.prepare_update,
            table=t,
            epoch=req.epoch,
            row_ids=req.row_ids,
            grads=req.grads,
            step=req.step,
            kind=opt.kind,
            lr=opt.lr,
            beta1=opt.beta1,
            beta2=opt.beta2,
            eps=opt.eps,
        )
        self.trimmer.note(3 * upd.grads.nbytes)  # the request and the update's temporaries
        if self.importing or self.staging.busy():  # checked under the table lock, right before the apply
            raise unavailable(
                f"shard {store.shard_id} is importing slots: updates wait for the new slot map (MigrateSlots); retry",
                Reason.SLOT_FROZEN,
            )
        pend = self.agg.pending(t)
        if req.num_parts <= 1:
            if pend is not None:
                raise invalid(
                    f"num_parts: {req.num_parts}, but step {pend.step} of table {t} is collecting "
                    f"{pend.num_parts} parts"
                )
            rows = await self._run(store.apply_update, upd)
            self.updates += 1
            return shard_pb2.ApplyGradientsResponse(applied_step=store.applied_step[t], rows_updated=rows)
        held = upd.grads.nbytes + upd.rows.nbytes
        self.budget.take(held, f"part {req.part_id!r} of step {req.step}")  # until the step is applied or discarded
        try:
            merged = self.agg.add(upd, part_id=req.part_id, num_parts=req.num_parts, version=opt.version)
        except BaseException:
            self.budget.give(held)
            raise
        if merged is None:
            return shard_pb2.ApplyGradientsResponse(applied_step=store.applied_step[t], pending=True)
        try:
            rows = await self._run(store.apply_update, merged)
        finally:
            done = self.agg.finish(t)
            self.budget.give(done.nbytes if done is not None else held)
        self.updates += 1
        return shard_pb2.ApplyGradientsResponse(applied_step=store.applied_step[t], rows_updated=rows)

    # ---------------------------------------------------------------------------------------
    # stats

    def info(self) -> dict:
        """A small summary for the control plane's registry (msgpack-able)."""
        view = self.store.view
        return {
            "epoch": view.epoch,
            "slots": len(view.owned),
            "rss_bytes": psutil.Process().memory_info().rss,
            "rows": sum(d["num_rows"] for d in self.store.table_stats()),
            "bytes": self.store.nbytes(),
            "lookups": self.lookups,
            "rows_served": self.rows_served,
            "updates": self.updates,
            "applied_step": dict(self.store.applied_step),
            "max_staleness_seen": self.max_staleness_seen,
            **self._row_paths_info(),
            "steps_discarded": self.steps_discarded,
            "freezes_lifted": self.store.frozen.lifted,
            "inflight_refused": self.budget.refused,
        }

    def _row_paths_info(self) -> dict:
        if not self.row_paths:
            return {}
        files = {str(t): name for t, name in self.store.memory.files().items()}  # they change with the slot map
        return {"row_paths": {**self.row_paths, "shm_files": files}}

    def stats(self) -> shard_pb2.StatsResponse:
        view = self.store.view
        return shard_pb2.StatsResponse(
            shard_id=self.store.shard_id,
            epoch=view.epoch,
            slots=list(view.owned),
            tables=[shard_pb2.TableStats(**d) for d in self.store.table_stats()],
            rss_bytes=psutil.Process().memory_info().rss,
            lookups=self.lookups,
            rows_served=self.rows_served,
            updates=self.updates,
            max_staleness_seen=self.max_staleness_seen,
        )
