"""The control plane on Redis: layout, slot map + epoch, shard registry, checkpoint manifests."""

from services.control.store import ControlPlane, ControlPlaneUnavailable, ShardRecord, SlotMap

__all__ = ["ControlPlane", "ControlPlaneUnavailable", "ShardRecord", "SlotMap"]
