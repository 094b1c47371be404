"""Replicated slots on the client: which holder to read, and a write that reaches every holder.

Reads: a slot's primary first; a lookup that fails with UNAVAILABLE / DEADLINE_EXCEEDED (a
killed shard, a refused connection), or gets no answer in `cluster.replica_switch_s` (a
stopped shard), is sent again to the slot's next holder (lookups are idempotent).

Writes (`apply_replicated`): every holder of a slot gets the slot's rows of the step, each
holder once. The push is answered when every holder of the current slot map applied it; a
holder that fails is waited for until the control plane's map no longer lists it (the
failover leader fenced it, docs/failover.md), then dropped. A holder that answers "step is
from the past" already holds the step: it received the slot from a copy made after the
step was applied (one source, one freeze: services/control/failover.py), so it counts as
applied. The optimizer is deterministic, so holders that applied the same steps hold
bit-identical rows.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch

from proto.shard.v1 import shard_pb2
from services.client.errors import Code, Reason, ShardError, error_reason
from services.client.gradients import push_request
from services.client.routing import slot_of

SWITCH_CODES = (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)


def holder_matrix(owners: list[int], replicas: list[list[int]] | None) -> np.ndarray | None:
    """-> (num_slots, R) int64 holders per slot, primary first, -1 padded; None for a map without replicas
    (cluster.replicas=1). A replicated map that lost copies (one holder left) keeps its matrix."""
    if not replicas:
        return None
    width = 1 + max(len(r) for r in replicas)
    out = np.full((len(owners), width), -1, dtype=np.int64)
    for s, o in enumerate(owners):
        row = [o, *replicas[s]]
        out[s, : len(row)] = row
    return out


def alternate_owners(holders: np.ndarray, exclude: set[int]) -> np.ndarray:
    """(S, R) holders -> (S,) the first holder of each slot not in `exclude`, -1 where none is left."""
    ok = (holders >= 0) & ~np.isin(holders, list(exclude))  # (S, R)
    first = np.argmax(ok, axis=1)  # (S,)
    alt = holders[np.arange(holders.shape[0]), first]
    alt[~ok.any(axis=1)] = -1
    return alt


async def apply_replicated(
    client: Any,
    *,
    table: int,
    ids: np.ndarray,
    grads: torch.Tensor,
    step: int,
    opt: shard_pb2.OptimizerParams,
    part_id: str,
    num_parts: int,
    max_staleness: int,
    deadline: float,
) -> dict[int, shard_pb2.ApplyGradientsResponse]:
    """Send (U,) ids / (U, D) grads of `step` to every holder of their slots -> shard -> answer."""
    loop = asyncio.get_running_loop()
    check_s = client.cfg.cluster.failover_check_s
    done: dict[int, shard_pb2.ApplyGradientsResponse] = {}
    waits = refreshes = 0
    last_error: BaseException | None = None
    while True:
        routing = client._routing
        holders = routing.holders if routing.holders is not None else routing.owners[:, None]  # (S, R)
        num_slots = holders.shape[0]
        targets = sorted({int(h) for h in np.unique(holders) if h >= 0} - set(done))
        if not targets:
            return done
        mine = holders[slot_of(ids, num_slots)] if ids.size else holders[:0]  # (U, R) holders of each row
        requests = {}
        for t in targets:
            pos = np.flatnonzero((mine == t).any(axis=1))  # (n_t,) rows this holder keeps
            t_ids, t_g = ids[pos], grads[torch.from_numpy(pos)] if pos.size else grads[:0]
            requests[t] = push_request(
                table=table,
                epoch=routing.epoch,
                ids=t_ids,
                grads=t_g,
                step=step,
                opt=opt,
                part_id=part_id,
                num_parts=num_parts,
                max_staleness=max_staleness,
            )
        tasks = {
            t: asyncio.ensure_future(client._apply_one(t, requests[t], routing=routing, deadline=deadline))
            for t in targets
        }
        fenced: set[int] = set()
        try:
            pending = set(tasks.values())
            while pending:  # wait, but watch the map: a holder the leader fenced is not waited for
                _, pending = await asyncio.wait(pending, timeout=check_s)
                if not pending or client.control is None:
                    continue
                try:
                    await client._newer_than(client._routing.epoch)
                except Exception:  # noqa: BLE001 - a control plane that is down says nothing about the shards
                    continue
                now = client._routing
                listed = set(np.unique(now.holders if now.holders is not None else now.owners).tolist())
                for t, task in tasks.items():
                    if t not in listed and not task.done():
                        task.cancel()
                        fenced.add(t)
        finally:
            for task in tasks.values():
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        stale = busy = False
        for t, task in tasks.items():
            if task.cancelled():
                busy = busy or t not in fenced
                continue
            exc = task.exception()
            reason = None if exc is None else error_reason(exc)
            if exc is None:
                done[t] = task.result()
            elif reason == Reason.STEP_FROM_PAST:
                done[t] = shard_pb2.ApplyGradientsResponse(applied_step=step)
            elif reason == Reason.PART_ALREADY_RECEIVED:  # a part re-sent after its answer was lost
                done[t] = shard_pb2.ApplyGradientsResponse(applied_step=step - 1, pending=True)
            elif isinstance(exc, ShardError) and exc.code == Code.FAILED_PRECONDITION:
                stale, last_error = True, exc
            elif isinstance(exc, ShardError) and exc.code in SWITCH_CODES:
                busy, last_error = True, exc
            else:
                if done and isinstance(exc, ShardError):
                    exc.add_note(f"shards {sorted(done)} applied their part of step {step}")
                raise exc
        if not stale and not busy:
            continue  # every target answered: the loop ends when no holder is left to send to
        if stale:
            if refreshes >= client.retry.max_refreshes and not await client._newer_than(routing.epoch):
                assert last_error is not None
                raise last_error
            refreshes += 1
            await client._newer_than(routing.epoch)
            continue
        waits += 1
        delay = min(client.retry.backoff(waits), check_s)
        if loop.time() + delay >= deadline:
            raise last_error or ShardError(
                Code.DEADLINE_EXCEEDED,
                f"step {step} of table {table} was not applied by every holder before the deadline",
                call="ApplyGradients",
            )
        await asyncio.sleep(delay)
        if client.control is not None:
            await client._newer_than(routing.epoch)
