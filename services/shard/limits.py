"""Bounds on what one request can leave behind on a shard (the "no wedges" rules).

- `Freezes`: a MigrateSlots freeze is a lease. It holds while the stream runs, then lifts
  `lease_s` after it ended unless a SetSlotMap came first. A slot whose lease ran out is
  remembered as *expired*: updates may have reached it since it was copied, so a slot map
  that hands it to another shard is refused until it is migrated again.
- `InflightBudget`: bytes of requests being handled (request + reply + temporaries, and the
  parts of pending sync steps); a request that would go beyond the cap is refused with
  RESOURCE_EXHAUSTED before it allocates anything.
- `check_target`, `check_peer`: the peer a MigrateSlots may dial (host:port of a shard registered
  in the control plane, alive, not this one; checkpoint names are checked in checkpoint.py).
- `BadRequestLog`: one log line per refused request, at most `per_s` lines a second (then a
  count of the lines left out), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from services.shard.errors import Code, Reason, ShardError, invalid, precondition
from services.telemetry import record_shard_event


@dataclass(slots=True)
class _Freeze:
    target: str
    expires: float  # time.monotonic(); inf while the migration stream runs


class Freezes:
    def __init__(self) -> None:
        self._frozen: dict[int, _Freeze] = {}
        self.expired: dict[int, str] = {}  # slot -> target of a migration whose lease ran out
        self.lifted = 0  # leases that ran out (a metric)

    def freeze(self, slots: list[int], target: str) -> list[int]:
        """Freeze `slots` until `arm` + lease or `clear` -> the slots that were not frozen before."""
        new = [s for s in slots if s not in self._frozen]
        for s in slots:
            self._frozen[s] = _Freeze(target, math.inf)
            self.expired.pop(s, None)
        return new

    def arm(self, slots: list[int], lease_s: float) -> None:
        """The stream ended: the freeze now lifts `lease_s` from now unless the slot map changes first."""
        expires = time.monotonic() + lease_s
        for s in slots:
            if s in self._frozen:
                self._frozen[s].expires = expires

    def unfreeze(self, slots: list[int]) -> None:
        for s in slots:
            self._frozen.pop(s, None)

    def active(self) -> dict[int, str]:
        """slot -> target of the freezes still holding (expired leases are lifted here)."""
        if self._frozen:
            now = time.monotonic()
            for s in [s for s, f in self._frozen.items() if f.expires <= now]:
                self.expired[s] = self._frozen.pop(s).target
                self.lifted += 1
        return {s: f.target for s, f in self._frozen.items()}

    def clear(self) -> None:
        self._frozen.clear()
        self.expired.clear()


class InflightBudget:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self.refused = 0

    def take(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.capacity:
            self.refused += 1
            record_shard_event("inflight_refused")
            raise ShardError(
                Code.RESOURCE_EXHAUSTED,
                f"{what} needs {nbytes / 2**20:.1f} MiB but the shard already holds {self.used / 2**20:.1f} of "
                f"{self.capacity / 2**20:.0f} MiB for requests in flight (cluster.inflight_mb); retry later or "
                "send smaller requests",
                reason=Reason.OVERLOADED,
            )
        self.used += nbytes

    def give(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)

    @contextlib.contextmanager
    def hold(self, nbytes: int, what: str) -> Iterator[None]:
        self.take(nbytes, what)
        try:
            yield
        finally:
            self.give(nbytes)


class BadRequestLog:
    def __init__(self, log: logging.Logger, *, per_s: int = 20) -> None:
        self.log, self.per_s = log, per_s
        self.window = 0.0
        self.lines = self.dropped = 0
        self.total = 0

    def note(self, what: str, error: ShardError | str) -> None:
        self.total += 1
        record_shard_event("bad_request")
        now = time.monotonic()
        if now - self.window >= 1.0:
            if self.dropped:
                self.log.warning("%d more bad requests in the last second (not logged one by one)", self.dropped)
            self.window, self.lines, self.dropped = now, 0, 0
        if self.lines >= self.per_s:
            self.dropped += 1
            return
        self.lines += 1
        text = str(error)
        self.log.warning("bad request: %s refused: %s", what, text if len(text) <= 300 else text[:300] + "...")


def check_target(target: str) -> None:
    """`host:port` of a peer shard, nothing else (no unix: or other channel schemes)."""
    host, _, port = target.rpartition(":")
    ok = 0 < len(target) <= 255 and host and "/" not in target and port.isdigit() and 0 < int(port) < 65536
    if not ok or any(c.isspace() or not c.isprintable() for c in target):
        raise invalid(f"target: {target[:80]!r} is not host:port of a shard")


async def check_peer(target: str, peers: Callable[[], Awaitable[list]] | None, *, self_id: int) -> None:
    """MigrateSlots dials only a shard the control plane registered (alive, another id) at `target`."""
    if peers is None:
        raise precondition(
            "target: a standalone shard has no registry to check a migration target against; "
            "MigrateSlots needs the control plane",
            Reason.MIGRATION_REFUSED,
        )
    try:
        records = await asyncio.wait_for(peers(), timeout=2.0)
    except Exception as exc:  # noqa: BLE001 - unreachable or tampered: never dial an unchecked address
        raise ShardError(
            Code.UNAVAILABLE,
            f"target: cannot read the shard registry to check {target}: {exc}",
            reason=Reason.REGISTRY_UNAVAILABLE,
        ) from None
    if not any(r.address == target and r.alive and r.shard_id != self_id for r in records):
        raise invalid(f"target: {target[:80]} is not the address of a live shard registered in the control plane")
