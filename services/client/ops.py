"""The client's calls besides lookups: admin (stats, health, slot moves) and training reads, and
`ShardOps`, the mixin of `ShardClient` that gathers every group of calls.

Gradient pushes live in services/client/push.py, checkpoints in services/client/checkpoints.py.
A mixin of `ShardClient` (services/client/client.py), which provides `_routing`, `_call`,
`refresh`, `lookup`, `layout`, `control` and the limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from grpc_health.v1 import health_pb2

from proto.shard.v1 import shard_pb2
from services.client.base import ClientBase
from services.client.checkpoints import ADMIN_TIMEOUT_S, CheckpointOps
from services.client.errors import ShardError
from services.client.push import ApplyResult, PushOps

if TYPE_CHECKING:
    from services.client.channels import Endpoint


class AdminOps(ClientBase):
    # -----------------------------------------------------------------------------------------
    # training: applied steps, whole tables

    async def applied_steps(self, *, timeout_s: float = 10.0) -> dict[int, int]:
        """{table: oldest applied_step over the shards that own slots}."""
        if self._routing.holders is not None and self.control is not None:
            await self.refresh()  # replicated: a failed-over holder is not asked
        stats = await self.stats(self._routing.shard_ids(), timeout_s=timeout_s)
        out: dict[int, int] = {}
        for st in stats.values():
            for t in st.tables:
                out[t.table] = min(out.get(t.table, t.applied_step), t.applied_step)
        return out

    async def wait_applied(self, step: int, *, timeout_s: float = 120.0) -> dict[int, int]:
        """Wait until every table on every slot-owning shard has applied `step` -> {table: applied}."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + timeout_s, 5e-4
        while True:
            applied = await self.applied_steps()
            if min(applied.values(), default=step) >= step:
                return applied
            if loop.time() > deadline:
                raise TimeoutError(f"shards did not apply step {step} in {timeout_s:g} s (applied: {applied})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def pull_table(self, table: int, *, chunk_rows: int = 1 << 16) -> torch.Tensor:
        """The whole table (R, D) fp32, read back from the shards (exact: an fp32 lookup)."""
        if self.wire_dtype != "fp32":
            sibling = cast(Any, type(self))(
                self.cfg,
                epoch=self.epoch,
                owners=self.owners,
                addresses=self.addresses,
                control=self.control,
                wire_dtype="fp32",
                timeout_s=self.timeout_s,
                security=self.security,  # cfg may be the cluster's stored layout: not this process's certificates
                row_path="grpc",  # one whole-table read: the row paths' set-up is not worth it
            )
            try:
                return await sibling.pull_table(table, chunk_rows=chunk_rows)
            finally:
                await sibling.close()
        n = self.layout(table).num_rows
        handles = [
            self.lookup(table, np.arange(a, min(n, a + chunk_rows)), dedup_ids=False) for a in range(0, n, chunk_rows)
        ]
        return torch.cat([(await h).float() for h in handles])  # (R, D)

    # -----------------------------------------------------------------------------------------
    # admin

    async def stats(
        self, shard_ids: list[int] | None = None, *, timeout_s: float = 5.0, errors: str = "raise"
    ) -> dict[int, Any]:
        """shard id -> StatsResponse (or the ShardError, with errors="return")."""
        return await self._each(
            shard_ids,
            call="Stats",
            invoke=lambda ep, t: ep.stub.Stats(shard_pb2.StatsRequest(), timeout=t),
            timeout_s=timeout_s,
            errors=errors,
        )

    async def health(self, shard_ids: list[int] | None = None, *, timeout_s: float = 5.0) -> dict[int, str]:
        """shard id -> "SERVING" / "NOT_SERVING" / ... or "ERROR: <what>"."""
        out = await self._each(
            shard_ids,
            call="Health.Check",
            invoke=lambda ep, t: ep.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=t),
            timeout_s=timeout_s,
            errors="return",
        )
        return {
            k: (
                f"ERROR: {v}"
                if isinstance(v, Exception)
                else health_pb2.HealthCheckResponse.ServingStatus.Name(v.status)
            )
            for k, v in out.items()
        }

    async def _each(
        self,
        shard_ids: list[int] | None,
        *,
        call: str,
        invoke: Callable[[Endpoint, float], Awaitable[Any]],
        timeout_s: float,
        errors: str,
    ) -> dict[int, Any]:
        if errors not in ("raise", "return"):
            raise ValueError(f"errors: 'raise' or 'return', got {errors!r}")
        routing = self._routing
        ids = sorted(routing.addresses) if shard_ids is None else list(shard_ids)
        deadline = asyncio.get_running_loop().time() + timeout_s
        outs = await asyncio.gather(
            *(self._call(i, call, invoke, routing=routing, deadline=deadline, idempotent=True) for i in ids),
            return_exceptions=True,
        )
        for out in outs:
            if isinstance(out, BaseException) and (errors == "raise" or not isinstance(out, ShardError)):
                raise out
        return dict(zip(ids, outs, strict=True))

    async def migrate_slots(
        self, source: int, slots: list[int], target_address: str, *, epoch: int, timeout_s: float = ADMIN_TIMEOUT_S
    ) -> shard_pb2.MigrateSlotsResponse:
        request = shard_pb2.MigrateSlotsRequest(slots=slots, target=target_address, epoch=epoch)
        deadline = asyncio.get_running_loop().time() + timeout_s
        return await self._call(
            source,
            "MigrateSlots",
            lambda ep, t: ep.stub.MigrateSlots(request, timeout=t),
            routing=self._routing,
            deadline=deadline,
            idempotent=False,
        )

    async def set_slot_map_on(
        self, shard_id: int, *, epoch: int, owned_slots: list[int], timeout_s: float = 60.0
    ) -> shard_pb2.SetSlotMapResponse:
        request = shard_pb2.SetSlotMapRequest(epoch=epoch, owned_slots=owned_slots)
        deadline = asyncio.get_running_loop().time() + timeout_s
        return await self._call(
            shard_id,
            "SetSlotMap",
            lambda ep, t: ep.stub.SetSlotMap(request, timeout=t),
            routing=self._routing,
            deadline=deadline,
            idempotent=True,
        )


class ShardOps(PushOps, CheckpointOps, AdminOps):
    """Every non-lookup call of `ShardClient`."""


__all__ = ["ADMIN_TIMEOUT_S", "ApplyResult", "ShardOps"]
