"""Which way a shard's rows come: shared memory, the TCP data plane, or the gRPC Lookup.

    cluster.row_path = auto   shm when the shard registered this client's host_id and its table
                              files open here, else tcp, else grpc
                     = shm | tcp | grpc   that path first; shm still falls back to tcp, tcp to grpc

The shards register `row_paths` (host_id, data_address, shm_files, shm_token) in the
control plane's registry; `update()` takes them from the shard records. Every path returns
the rows and the shard's applied step, and enforces `step`/`max_staleness` like the gRPC
Lookup. `lookup()` returns None when the call should go over gRPC: no fast path known for
that shard, or one that failed for a reason gRPC handles (a shard not yet at this epoch, a
connection that broke). Each fallback from shared memory or from the data plane is logged
once per client, with the reason. Errors that are the request's (stale epoch, bad ids) are
raised as `ShardError`s with the codes the gRPC Lookup uses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import torch

from services.client.dataplane import DataPlaneClient, DataPlaneDown
from services.client.errors import Code, RetryPolicy, ShardError
from services.client.peers import Peer
from services.client.row_request import RowRequest
from services.client.shm_paths import ShmPaths, ShmReads
from services.shard.shm_table import local_host_id
from services.wire import TORCH_DTYPES

log = logging.getLogger("engram.client")


class RowPaths(ShmPaths):
    """Each shard's registered row paths and this client's state for them; shared-memory reads in
    `ShmPaths` (shm_paths.py), data-plane connections in `DataPlaneClient` (dataplane.py)."""

    def __init__(
        self,
        *,
        mode: str = "auto",
        host_id: str = "",
        shm_dir: str = "/dev/shm",
        retry: RetryPolicy | None = None,
        tcp_ssl: Any = None,
        tcp_server_name: str = "",
    ) -> None:
        if mode not in ("auto", "shm", "tcp", "grpc"):
            raise ValueError(f"row_path: unknown {mode!r} (auto, shm, tcp or grpc)")
        self.mode = mode
        self.host_id = local_host_id(host_id)
        self.shm_dir = shm_dir
        self.retry = retry or RetryPolicy()
        self.tcp_ssl, self.tcp_server_name = tcp_ssl, tcp_server_name  # TLS on the data plane (ssl.SSLContext)
        self._peers: dict[str, Peer] = {}
        self._warned: set[str] = set()
        self.used: dict[str, int] = {"shm": 0, "tcp": 0, "grpc": 0}  # lookups served per path
        self.shm_reads = ShmReads()
        self._count_lock = threading.Lock()  # `read_now` may run on a caller's thread (SyncShardClient)

    # ---------------------------------------------------------------------------------------

    def update(self, records: list[Any]) -> None:
        """Take the registered row paths of shard records (`ControlPlane.shards()`). A record whose
        row paths changed on a known address (the shard restarted there: a new token, files and
        data port) replaces that shard's state, fallbacks included; an unchanged one keeps it."""
        for r in records:
            info = (getattr(r, "info", None) or {}).get("row_paths")
            if not isinstance(info, dict):
                continue
            try:
                files = {int(t): str(name) for t, name in dict(info.get("shm_files") or {}).items()}
                peer = Peer(
                    host_id=str(info.get("host_id", "")),
                    data_address=str(info.get("data_address", "")),
                    shm_files=files,
                    token=bytes.fromhex(str(info.get("shm_token", ""))),
                )
            except (TypeError, ValueError) as exc:
                log.warning("shard %s registered unreadable row paths (%s); using gRPC for it", r.address, exc)
                continue
            old = self._peers.get(r.address)
            if old is not None:
                if (old.token, old.data_address, old.shm_files, old.host_id) == (
                    peer.token,
                    peer.data_address,
                    peer.shm_files,
                    peer.host_id,
                ):
                    continue  # the same shard process: keep its open files and connections
                if old.tcp is not None:  # a new process on the same address (a restart): its own files and port
                    old.tcp.close()
            if not peer.shm_files:
                peer.shm_off = f"the shard publishes no tables in shared memory ({info.get('shm_reason') or '?'})"
            elif peer.host_id != self.host_id:
                peer.shm_off = f"the shard runs on host {peer.host_id!r}, this client on {self.host_id!r}"
            if not peer.data_address:
                peer.tcp_off = "the shard registered no data-plane address"
            self._peers[r.address] = peer

    def _fallback(self, what: str, peer: Peer, *, address: str, reason: str) -> None:
        """Turn a path off for one shard; log it once per client and path."""
        setattr(peer, f"{what}_off", reason)
        if what not in self._warned:
            self._warned.add(what)
            nxt = "the TCP data plane" if what == "shm" and self.mode != "grpc" and not peer.tcp_off else "gRPC"
            log.warning(
                "rows of shard %s: %s path unavailable (%s); using %s (logged once)",
                address,
                "shared-memory" if what == "shm" else "TCP data-plane",
                reason,
                nxt,
            )

    # ---------------------------------------------------------------------------------------

    async def lookup(
        self, req: RowRequest, *, shard_id: int, address: str, deadline: float
    ) -> tuple[torch.Tensor, int] | None:
        """-> ((n, D) rows, applied step) by shared memory or TCP, or None: use gRPC."""
        peer = self._peers.get(address)
        if peer is None or self.mode == "grpc":
            return None
        if self.mode in ("auto", "shm") and not peer.shm_off and req.dtype in TORCH_DTYPES:  # fp8: not in shm
            got = await self._shm(peer, address, req, deadline=deadline)
            if got is not None:
                self.count_shm(req.ids.size, req.step, got[1])
                return got
        if not peer.tcp_off:
            got = await self._tcp(peer, address, req, shard_id=shard_id, deadline=deadline)
            if got is not None:
                self.used["tcp"] += 1
                return got
        return None

    def tcp_first(self, address: str, dtype: int) -> bool:
        """Would `lookup()` try this shard's TCP data plane first (not shared memory, not gRPC)?"""
        peer = self._peers.get(address)
        if peer is None or peer.tcp_off or self.mode == "grpc":
            return False
        return self.mode == "tcp" or bool(peer.shm_off) or dtype not in TORCH_DTYPES

    async def tcp_once(
        self, req: RowRequest, *, shard_id: int, address: str, deadline: float
    ) -> tuple[torch.Tensor, int]:
        """One data-plane request and nothing else (`tcp_first` said so): ((n, D) rows, applied step).

        Raises what went wrong (ShardError, DataPlaneDown, TimeoutError) for the caller to take
        the call from the top with `lookup()`, whose retries and fallbacks then apply.
        """
        tcp = self._data_plane(self._peers[address], address, shard_id=shard_id)
        async with asyncio.timeout_at(deadline):
            got = await tcp.lookup(req)
        self.used["tcp"] += 1
        return got

    def tcp_issue(
        self, req: RowRequest, *, shard_id: int, address: str
    ) -> asyncio.Future[tuple[torch.Tensor, int]] | None:
        """One data-plane request written now on an idle connection (`tcp_first` said so) -> its future
        ((n, D) rows, applied step), or None when no connection is idle (then `await tcp_once(...)`)."""
        return self._data_plane(self._peers[address], address, shard_id=shard_id).issue(req)

    def _data_plane(self, peer: Peer, address: str, *, shard_id: int) -> DataPlaneClient:
        """The shard's data-plane client (its connection pool), made on first use."""
        if peer.tcp is None:
            peer.tcp = DataPlaneClient(
                peer.data_address,
                shard_id=shard_id,
                shard_address=address,
                ssl_context=self.tcp_ssl,
                server_name=self.tcp_server_name,
            )
        return peer.tcp

    async def _tcp(
        self, peer: Peer, address: str, req: RowRequest, *, shard_id: int, deadline: float
    ) -> tuple[torch.Tensor, int] | None:
        loop = asyncio.get_running_loop()
        tcp = self._data_plane(peer, address, shard_id=shard_id)
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ShardError(
                    Code.DEADLINE_EXCEEDED,
                    "no answer before the deadline",
                    address=address,
                    shard_id=shard_id,
                    call=f"Lookup (data plane at {peer.data_address})",
                )
            try:
                async with asyncio.timeout_at(deadline):  # no extra task, unlike wait_for
                    return await tcp.lookup(req)
            except TimeoutError:
                raise ShardError(
                    Code.DEADLINE_EXCEEDED,
                    "no answer before the deadline",
                    address=address,
                    shard_id=shard_id,
                    call=f"Lookup (data plane at {peer.data_address})",
                ) from None
            except DataPlaneDown as exc:
                self._fallback("tcp", peer, address=address, reason=str(exc))
                peer.tcp_off = ""  # try the data plane again next call; this one goes over gRPC
                return None
            except ShardError as err:
                attempt += 1
                if err.code != Code.UNAVAILABLE or attempt >= self.retry.max_attempts:
                    raise
                delay = self.retry.backoff(attempt)
                if loop.time() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)

    def close(self) -> None:
        for peer in self._peers.values():
            if peer.tcp is not None:
                peer.tcp.close()
            peer.readers.clear()
