"""Slot migration and slot maps on the shard: MigrateSlots (send), ImportSlots (stage), SetSlotMap.

A mixin of `ShardEngine` (engine.py: locks, the worker pool). Protocol: services/shard/migrate.py;
an epoch-only map (the same slots, a failover elsewhere) moves the epoch without a table copy.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from engram.config import ClusterConfig
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.grpc_options import channel_options
from services.shard.errors import Code, Reason, ShardError, invalid, precondition
from services.shard.limits import check_peer, check_target
from services.shard.migrate import Staging, slot_chunks
from services.shard.store import ShardStore

T = TypeVar("T")


class SlotMapOps:
    store: ShardStore
    limits: ClusterConfig
    admin: asyncio.Lock
    import_lock: asyncio.Lock
    importing: bool
    locks: dict[int, asyncio.Lock]
    staging: Staging
    address: str
    chunk_bytes: int
    max_message_bytes: int
    dial: Callable[[str, list], Any]
    slot_map_source: Callable[[], Awaitable] | None
    peers_source: Callable[[], Awaitable[list]] | None

    if TYPE_CHECKING:  # ShardEngine's

        async def _run(self, fn: Callable[..., T], *args, **kwargs) -> T: ...

        def _all_tables(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def migrate_slots(self, req: shard_pb2.MigrateSlotsRequest) -> shard_pb2.MigrateSlotsResponse:
        store = self.store
        if not req.target:
            raise invalid("target: required (host:port of the receiving shard)")
        check_target(req.target)
        if req.target == self.address:
            raise invalid(f"target: {req.target} is this shard")
        await check_peer(req.target, self.peers_source, self_id=store.shard_id)
        async with self.admin:
            view = store.view
            store.check_epoch(view, req.epoch)
            slots = sorted(set(req.slots))
            if not slots or len(slots) != len(req.slots):
                raise invalid(f"slots: need distinct slots to send, got {list(req.slots)}")
            not_owned = [s for s in slots if s not in view.owned]
            if not_owned:
                raise precondition(
                    f"slots {not_owned[:8]} are not owned by shard {store.shard_id} at epoch {view.epoch}",
                    Reason.SLOT_NOT_OWNED,
                )
            async with self._all_tables():  # in-flight updates finish; later ones see the freeze
                froze = store.frozen.freeze(slots, req.target)
            sent = {"bytes": 0}

            async def chunks() -> AsyncIterator[shard_pb2.SlotChunk]:
                for t in sorted(store.layouts):
                    for s in slots:
                        gen = slot_chunks(store, table=t, slot=s, epoch=view.epoch, chunk_bytes=self.chunk_bytes)
                        while (chunk := await self._run(next, gen, None)) is not None:
                            sent["bytes"] += len(chunk.weights) + len(chunk.state)
                            yield chunk

            opts = channel_options(
                max_message_bytes=self.max_message_bytes, keepalive_s=self.limits.keepalive_s, retries=False
            )  # ImportSlots streams: never resent by the channel
            try:
                async with self.dial(req.target, opts) as channel:
                    resp = await shard_pb2_grpc.MemoryShardStub(channel).ImportSlots(
                        chunks(), timeout=self.limits.migrate_timeout_s
                    )
            except grpc.aio.AioRpcError as exc:
                store.frozen.unfreeze(froze)
                raise ShardError(
                    exc.code(),
                    f"migrating slots {slots} to {req.target} failed: {exc.details()}",
                    reason=Reason.MIGRATION_FAILED,
                ) from None
            except BaseException:
                store.frozen.unfreeze(froze)
                raise
            store.frozen.arm(slots, self.limits.freeze_lease_s)  # lifts unless a slot map comes in time
        return shard_pb2.MigrateSlotsResponse(
            slots_sent=resp.slots_received // max(1, len(store.layouts)), bytes_sent=sent["bytes"]
        )

    async def import_slots(self, chunks: AsyncIterator[shard_pb2.SlotChunk]) -> shard_pb2.ImportSlotsResponse:
        received = 0
        limit = self.limits.migrate_timeout_s
        async with self.import_lock:
            async with self._all_tables():  # refused while a step collects parts; none starts until the map
                self.importing = True
            try:
                async with asyncio.timeout(limit):  # a stream that stalls must not hold the import lock
                    async for chunk in chunks:
                        received += await self._run(self.staging.add, chunk)
                for t, s in self.staging.partial_keys()[:1]:
                    raise invalid(f"stream ended before the last chunk of table {t} slot {s}")
            except TimeoutError:
                raise ShardError(
                    Code.DEADLINE_EXCEEDED,
                    f"import stream still open after {limit:g} s (cluster.migrate_timeout_s); partial slots dropped",
                    reason=Reason.TIMEOUT,
                ) from None
            finally:
                self.importing = False
                self.staging.drop_partial()
        return shard_pb2.ImportSlotsResponse(slots_received=received)

    async def _control_owners(self, epoch: int, owned: list[int], owners: list[int]) -> list[int] | None:
        """Check a slot map against the control plane's at the same epoch -> the full map, if known.

        The control plane is the source of truth: a map that contradicts its map at the same epoch
        is refused. Unreachable, or at another epoch: the request stands on its own.
        """
        if self.slot_map_source is None:
            return owners or None
        try:
            smap = await asyncio.wait_for(self.slot_map_source(), timeout=2.0)
        except Exception:  # best effort: the store's own checks still apply
            return owners or None
        if smap.epoch < epoch:
            raise precondition(
                f"epoch {epoch} is ahead of the control plane's slot map (epoch {smap.epoch}): write the map to the "
                "control plane first, or clients could never route at this epoch",
                Reason.SLOT_MAP_REFUSED,
            )
        if smap.epoch != epoch:
            return owners or None
        view = smap.view_for(self.store.shard_id)  # replicas: every slot this shard holds (docs/failover.md)
        mine = sorted(s for s, o in enumerate(view) if o == self.store.shard_id)
        if mine != sorted(owned) or (owners and list(owners) != list(view)):
            raise precondition(
                f"the control plane's slot map at epoch {epoch} gives shard {self.store.shard_id} slots {mine[:16]}, "
                f"this request says {sorted(owned)[:16]}{' with other owners' if owners else ''}: refused",
                Reason.SLOT_MAP_REFUSED,
            )
        return list(view)

    async def set_slot_map(self, req: shard_pb2.SetSlotMapRequest) -> shard_pb2.SetSlotMapResponse:
        owned = list(req.owned_slots)
        owners = await self._control_owners(req.epoch, owned, list(req.owners))
        view = self.store.view
        if tuple(sorted(set(owned))) == view.owned and req.epoch > view.epoch and len(owned) == len(set(owned)):
            async with self.admin, contextlib.AsyncExitStack() as locked:
                # same slots, newer map (docs/failover.md): only the epoch moves; a step collecting parts stays
                for t in sorted(self.locks):  # no update mid-write (the shm seqlock has one writer at a time)
                    await locked.enter_async_context(self.locks[t])
                self.store.bump_epoch(epoch=req.epoch, owners=owners)
                self.staging.clear()
            return shard_pb2.SetSlotMapResponse(slots_dropped=0)
        async with self.admin, self._all_tables():
            before = self.store.view.epoch
            dropped = await self._run(
                self.store.set_ownership,
                epoch=req.epoch,
                owned_slots=owned,
                owners=owners,
                staged=self.staging.complete,
            )
            if self.store.view.epoch != before:
                self.staging.clear()
        return shard_pb2.SetSlotMapResponse(slots_dropped=dropped)
