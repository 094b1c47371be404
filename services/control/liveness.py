"""Noticing a shard that stopped answering: its heartbeat key in the control plane ran out.

A stopped (SIGSTOP), hung or partitioned shard keeps its TCP connections open, so a call to
it only ends at its deadline. Every shard refreshes `{ns}:alive:{id}` every
`cluster.heartbeat_s` with a TTL of `cluster.heartbeat_ttl_s`; a caller waiting on a slow
call checks those keys every `check_every_s` and gives up as soon as the key of a shard that
owns slots is gone, i.e. within about heartbeat_ttl_s + check_every_s of the shard's last
beat instead of the call's deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from services.control.store import ControlPlane, ControlPlaneUnavailable

T = TypeVar("T")


class ShardSilent(Exception):
    """A shard's heartbeat key is gone while a call to it was still waiting."""

    def __init__(self, shard_id: int, address: str) -> None:
        self.shard_id, self.address = shard_id, address
        super().__init__(f"shard {shard_id} at {address} stopped heartbeating")


async def silent_shards(control: ControlPlane, shard_ids: Collection[int]) -> list[tuple[int, str]]:
    """(id, address) of the shards in `shard_ids` whose liveness key is gone.

    A control plane that cannot be reached, or that lost the registry (a Redis restarted empty,
    before the shard's next beat registers it again), says nothing about the shards: none.
    """
    try:
        records = await control.shards()
    except ControlPlaneUnavailable:
        return []
    return [(r.shard_id, r.address) for r in records if r.shard_id in shard_ids and not r.alive]


async def while_alive(
    awaitable: Awaitable[T],
    *,
    control: ControlPlane,
    shard_ids: Callable[[], Collection[int]],
    check_every_s: float,
) -> T:
    """await `awaitable`, but cancel it and raise ShardSilent once a shard of `shard_ids()` stops beating."""
    task: asyncio.Future[Any] = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=check_every_s)
            if done:
                return task.result()
            silent = await silent_shards(control, shard_ids())
            if silent:
                raise ShardSilent(*silent[0])
    finally:
        if not task.done():
            task.cancel()
