"""What the control plane stores, as values, and its errors: the slot map, a shard's record.

No I/O here (services/control/store.py reads and writes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import services.control.replicas as replica_math


class ControlPlaneUnavailable(RuntimeError):
    """Redis is down or unreachable; the message names the URL and what was being done."""


class TamperedEntry(ControlPlaneUnavailable):
    """An entry failed its signature and no verified copy is at hand (reported, not used)."""


@dataclass(slots=True)
class SlotMap:
    epoch: int
    owners: list[int]  # slot -> primary shard id
    replicas: list[list[int]] = field(default_factory=list)  # slot -> its other holders; [] = no replicas

    def slots_of(self, shard_id: int) -> list[int]:
        return [slot for slot, owner in enumerate(self.owners) if owner == shard_id]

    def holders(self, slot: int) -> list[int]:
        return replica_math.holders(self.owners, self.replicas, slot)

    def held_by(self, shard_id: int) -> list[int]:
        return replica_math.held_by(self.owners, self.replicas, shard_id)

    def view_for(self, shard_id: int) -> list[int]:
        return replica_math.view_for(self.owners, self.replicas, shard_id)

    def all_holders(self) -> set[int]:
        return replica_math.all_holders(self.owners, self.replicas)

    def to_value(self) -> dict:
        return {"epoch": self.epoch, "owners": list(self.owners), "replicas": [list(r) for r in self.replicas]}

    @classmethod
    def from_value(cls, value: dict) -> SlotMap:
        return cls(
            epoch=int(value["epoch"]),
            owners=[int(o) for o in value["owners"]],
            replicas=[[int(h) for h in r] for r in value.get("replicas") or []],
        )


@dataclass(slots=True)
class ShardRecord:
    shard_id: int
    address: str
    alive: bool
    info: dict[str, Any]
    last_seen: float


def redact_url(url: str) -> str:
    """redis://user:secret@host:port/0 -> redis://user:***@host:port/0 (never log a password)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
