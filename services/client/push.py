"""Gradient pushes: one optimizer step's rows to the shards that hold them.

A mixin of `ShardClient` (services/client/client.py), which provides `_routing`, `_call`,
`_newer_than`, `layout`, `control`, `retry` and the limits. R=1: each row goes to its slot's
owner (`_push_by_owner`); replicated slots: to every holder (services/client/replicas.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from proto.shard.v1 import shard_pb2
from services.client.base import ClientBase
from services.client.errors import Code, Reason, ShardError
from services.client.gradients import checked_grads, optimizer_params, push_request
from services.client.replicas import apply_replicated
from services.client.routing import as_id_array, check_range, split_by_owner
from services.client.state import Routing

# a shard's refusals that mean "not this slot map": refresh it and re-route the rows
ROUTING_STALE = frozenset({Reason.EPOCH_STALE, Reason.SLOT_NOT_OWNED})
# parts a shard already holds (re-sent after a lost answer, or the step was applied meanwhile)
ALREADY_HELD = frozenset({Reason.PART_ALREADY_RECEIVED, Reason.STEP_FROM_PAST})


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied_step: int  # lowest step fully applied to the table across the shards
    rows_updated: int
    pending: bool  # some shard waits for other parts of the step (sync mode)
    shards: dict[int, shard_pb2.ApplyGradientsResponse]


def _result(applied: dict[int, shard_pb2.ApplyGradientsResponse], *, rows: int) -> ApplyResult:
    return ApplyResult(
        applied_step=min((r.applied_step for r in applied.values()), default=0),
        rows_updated=rows,
        pending=any(r.pending for r in applied.values()),
        shards=applied,
    )


class PushOps(ClientBase):
    async def apply_gradients(
        self,
        table: int,
        row_ids: np.ndarray | torch.Tensor,
        grads: torch.Tensor | np.ndarray,
        *,
        step: int,
        optimizer: shard_pb2.OptimizerParams | dict,
        part_id: str = "",
        num_parts: int = 0,
        max_staleness: int = 0,
        timeout_s: float | None = None,
    ) -> ApplyResult:
        """Push summed gradients of distinct rows (U,) / (U, D) fp32 for optimizer step `step`.

        Every shard that owns slots gets its part (an empty one if none of its rows were
        touched), so sync-mode steps of `num_parts` parts complete on every shard. Not
        retried, except where a shard refused before touching state: after a stale slot map
        (FAILED_PRECONDITION: refresh, re-route) and while its slots migrate (UNAVAILABLE:
        back off until the new map is installed or the deadline passes).
        """
        layout = self.layout(table)
        if self.cfg.engram.row_format == "fp8":  # the shards refuse it too (READ_ONLY_TABLE)
            raise ValueError(
                f"apply_gradients: table {table} is stored as fp8 (E4M3 + UE8M0 scales), which is "
                "read-only; train an fp32 copy (engram.row_format=fp32)"
            )
        ids, shape = as_id_array(row_ids)
        if len(shape) != 1:
            raise ValueError(f"row_ids: expected a 1-D array of distinct rows, got shape {shape}")
        check_range(ids, layout.num_rows, table)
        s = np.sort(ids)
        dup = np.flatnonzero(s[1:] == s[:-1])
        if dup.size:
            raise ValueError(f"row_ids: row {int(s[dup[0]])} appears more than once; sum its gradients first")
        g = checked_grads(grads, n=ids.size, dim=layout.dim, table=table)  # (U, D)
        opt = optimizer_params(optimizer)
        deadline = asyncio.get_running_loop().time() + (self.timeout_s if timeout_s is None else timeout_s)
        part: dict[str, Any] = {
            "step": step,
            "opt": opt,
            "part_id": part_id,
            "num_parts": num_parts,
            "max_staleness": max_staleness,
        }
        if self._routing.holders is not None:  # replicated slots: every holder gets the update
            applied = await apply_replicated(self, table=table, ids=ids, grads=g, deadline=deadline, **part)
            return _result(applied, rows=max((r.rows_updated for r in applied.values()), default=0))
        return await self._push_by_owner(table=table, ids=ids, grads=g, deadline=deadline, part=part)

    async def _push_by_owner(
        self, *, table: int, ids: np.ndarray, grads: torch.Tensor, deadline: float, part: dict[str, Any]
    ) -> ApplyResult:
        """R=1: (U,) ids / (U, D) grads to their slots' owners, every owner once; refusals before any
        state changed (a stale map, a migrating slot) are re-routed or waited out."""
        loop = asyncio.get_running_loop()
        step, g = part["step"], grads
        applied: dict[int, shard_pb2.ApplyGradientsResponse] = {}
        refreshes = waits = 0
        while True:
            routing = self._routing
            groups = {grp.shard: grp for grp in split_by_owner(ids, routing.owners)}
            clash = sorted(set(groups) & set(applied))
            if clash:
                raise ShardError(
                    Code.ABORTED,
                    f"the slot map changed to epoch {routing.epoch} while step {step} of table {table} "
                    f"was applied: shards {sorted(applied)} applied their part, and rows moved to shards {clash} "
                    "which already did; re-run the step",
                    call="ApplyGradients",
                )
            targets = sorted(set(groups) | (set(routing.owners.tolist()) - set(applied)))
            requests, rows = {}, {}
            for t in targets:
                grp = groups.get(t)
                t_ids = ids[:0] if grp is None else grp.ids
                t_g = g[:0] if grp is None else g if grp.positions is None else g[torch.from_numpy(grp.positions)]
                size = t_ids.nbytes + t_g.numel() * 4
                if size + (64 << 10) > self.max_message_bytes:
                    raise ValueError(
                        f"grads: {size} bytes for shard {t} exceed cluster.max_message_mb="
                        f"{self.max_message_bytes >> 20}; push fewer rows per call"
                    )
                rows[t] = (t_ids, t_g)
                requests[t] = push_request(table=table, epoch=routing.epoch, ids=t_ids, grads=t_g, **part)
            outcomes = await asyncio.gather(
                *(self._apply_one(t, requests[t], routing=routing, deadline=deadline) for t in targets),
                return_exceptions=True,
            )
            retry_ids, retry_g, stale, busy, failure = [], [], None, None, None
            for t, out in zip(targets, outcomes, strict=True):
                if isinstance(out, ShardError) and out.code in (Code.FAILED_PRECONDITION, Code.UNAVAILABLE):
                    if out.code == Code.FAILED_PRECONDITION:
                        stale = out
                    else:
                        busy = out  # a migrating slot, an epoch not installed yet, or the transport
                    if t in groups:
                        retry_ids.append(rows[t][0])
                        retry_g.append(rows[t][1])
                elif isinstance(out, BaseException):
                    failure = failure or out
                else:
                    applied[t] = out
            if failure is not None:
                if applied and isinstance(failure, ShardError):
                    failure.add_note(f"shards {sorted(applied)} applied their part of step {step}")
                raise failure
            if stale is None and busy is None:
                return _result(applied, rows=sum(r.rows_updated for r in applied.values()))
            if stale is not None:
                if (
                    stale.reason not in ROUTING_STALE
                    or refreshes >= self.retry.max_refreshes
                    or not await self._newer_than(routing.epoch)
                ):
                    raise stale
                refreshes += 1
            else:
                assert busy is not None
                waits += 1
                delay = self.retry.backoff(waits)
                if loop.time() + delay >= deadline:
                    raise busy
                await asyncio.sleep(delay)
                if self.control is not None:
                    await self._newer_than(routing.epoch)  # the migration may have installed a new map meanwhile
            ids = np.concatenate(retry_ids) if retry_ids else ids[:0]
            g = torch.cat(retry_g) if retry_g else g[:0]

    async def _apply_one(
        self, shard_id: int, request: shard_pb2.ApplyGradientsRequest, *, routing: Routing, deadline: float
    ) -> shard_pb2.ApplyGradientsResponse:
        return await self._call(
            shard_id,
            "ApplyGradients",
            lambda ep, t: ep.stub.ApplyGradients(request, timeout=t),
            routing=routing,
            deadline=deadline,
            idempotent=False,
        )

    async def discard_pending(self, num_parts: int, *, timeout_s: float = 60.0) -> int:
        """Complete every half-collected step with empty parts -> how many parts were taken.

        A trainer that died mid-step can leave a step waiting for the parts of dead workers,
        and a shard refuses Restore while a step is pending. Right before a restore (which
        overwrites rows, optimizer state and applied_step) such a step is harmless to finish:
        each shard gets empty parts 0..num_parts-1 of its next step; the parts it already holds
        are refused (PART_ALREADY_RECEIVED, or STEP_FROM_PAST once applied) and ignored.
        """
        routing = self._routing
        owners = routing.shard_ids()
        stats = await self.stats(owners, timeout_s=timeout_s)
        opt = shard_pb2.OptimizerParams(
            kind=self.cfg.cluster.optimizer, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, version=1
        )
        deadline = asyncio.get_running_loop().time() + timeout_s
        sent = 0
        no_ids, no_grads = np.empty(0, dtype=np.int64), torch.empty(0, dtype=torch.float32)
        for sid in owners:
            for t in stats[sid].tables:
                for part in range(num_parts):
                    req = push_request(
                        table=t.table,
                        epoch=routing.epoch,
                        ids=no_ids,
                        grads=no_grads,
                        step=t.applied_step + 1,
                        opt=opt,
                        part_id=str(part),
                        num_parts=num_parts,
                    )
                    try:
                        await self._apply_one(sid, req, routing=routing, deadline=deadline)
                        sent += 1
                    except ShardError as exc:
                        if exc.reason not in ALREADY_HELD:
                            raise
        return sent
