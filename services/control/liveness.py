"""Noticing a shard that stopped answering: its heartbeat key in the control plane ran out.

A stopped (SIGSTOP), hung or partitioned shard keeps its TCP connections open, so a call to
it only ends at its deadline. Every shard refreshes `{ns}:alive:{id}` every
`cluster.heartbeat_s` with a TTL of `cluster.heartbeat_ttl_s`; a caller waiting on a slow
call checks that key every `check_every_s` and gives up as soon as it is gone, i.e. within
about heartbeat_ttl_s + check_every_s of the shard's last beat instead of the call's deadline.

Synchronous, for plain-thread callers (the trainer's row store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from services.control.store import ControlPlane, ControlPlaneUnavailable


class ShardSilent(Exception):
    """The shard's heartbeat key is gone while a call to it was still waiting."""


def heartbeat_alive(url: str, namespace: str) -> Callable[[int], bool]:
    """-> alive(shard_id): False only when the control plane answers, knows the shard, and its key is gone.

    A control plane that cannot be reached, or that lost the registry (a Redis restarted empty,
    before the shard's next beat registers it again), says nothing about the shard: alive.
    """

    def alive(shard_id: int) -> bool:
        async def read() -> bool:
            cp = ControlPlane.connect(url, namespace, timeout_s=1.0, retries=0)
            try:
                records = [s for s in await cp.shards() if s.shard_id == shard_id]
                return not records or records[0].alive
            finally:
                await cp.close()

        try:
            return asyncio.run(read())
        except ControlPlaneUnavailable:
            return True

    return alive


def result_while_alive(fut: grpc.Future, *, alive: Callable[[], bool], check_every_s: float) -> Any:
    """fut.result(), but raise ShardSilent (and cancel the call) once `alive()` says the shard is gone."""
    while True:
        try:
            return fut.result(timeout=check_every_s)
        except grpc.FutureTimeoutError:
            if not alive():
                fut.cancel()
                raise ShardSilent() from None
