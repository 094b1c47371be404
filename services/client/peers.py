"""What one shard registered about its row paths, and one client's state for it (row_paths.py,
shm_paths.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.client.dataplane import DataPlaneClient
from services.client.shm_reader import ShmTableReader


@dataclass(slots=True)
class Peer:
    """What one shard (by gRPC address) registered, and this client's state for it."""

    host_id: str
    data_address: str
    shm_files: dict[int, str]
    token: bytes
    shm_off: str = ""  # why shared memory is not used for this shard
    tcp_off: str = ""
    readers: dict[int, ShmTableReader] = field(default_factory=dict)
    tcp: DataPlaneClient | None = None
