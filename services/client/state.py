"""Routing snapshots and the concurrency helpers shared by the client's modules."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from services.client.errors import Code, ShardError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Routing:
    """A consistent snapshot of where slots live; replaced whole on refresh."""

    epoch: int
    owners: np.ndarray  # (num_slots,) int64 shard id per slot (the primary)
    addresses: dict[int, str]  # shard id -> host:port
    holders: np.ndarray | None = None  # (num_slots, R) int64, primary first, -1 padded; None = no replicas

    def shard_ids(self) -> list[int]:
        """Every shard that holds slots (primaries and replicas)."""
        ids = self.owners if self.holders is None else self.holders[self.holders >= 0]
        return sorted(set(ids.tolist()))

    def address(self, shard_id: int) -> str:
        address = self.addresses.get(shard_id)
        if not address:
            raise ShardError(
                Code.UNAVAILABLE,
                f"has no registered address (slot map epoch {self.epoch}); is it running?",
                shard_id=shard_id,
                call="routing",
            )
        return address


async def gather_or_cancel(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and raise that failure."""
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in tasks if t in done and not t.cancelled()]  # all retrieved
        for exc in errors:
            if exc is not None:
                raise exc
        return [t.result() for t in tasks]
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        for t in pending:  # retrieve what they end with, so nothing is logged as never retrieved
            t.add_done_callback(lambda t: t.cancelled() or t.exception())
