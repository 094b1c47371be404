"""`ShardClient`: batched, deduplicated, concurrent lookups and gradient pushes to the shards.

    client = await ShardClient.connect(ControlPlane.connect(url, ns))
    handle = client.lookup(table, ids)          # dedup -> split by slot owner -> chunk -> send
    rows = await handle                          # (*ids.shape, D) in request order
    await client.apply_gradients(table, uniq_ids, grads, step=s, optimizer=opt)

This module holds the slot map (refresh, background re-reads with replicas) and one call with
retries; the lookups are in lookups.py (phases, row paths), the other calls in ops.py.

Failures: UNAVAILABLE is retried with backoff for idempotent calls; FAILED_PRECONDITION
refreshes the slot map from the control plane and, if the epoch moved, re-routes the ids
of the failed message; anything else is raised as one `ShardError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from engram.config import Config, SecurityConfig
from engram.layout import TableLayout, even_slot_map, table_layouts
from engram.row_format import check_wire_format
from services import wire
from services.client.channels import ChannelPool, Endpoint, channel_options
from services.client.errors import RETRYABLE, Code, Reason, RetryPolicy, ShardError, from_rpc_error
from services.client.lookups import ShardLookups
from services.client.ops import ShardOps
from services.client.replicas import holder_matrix
from services.client.row_paths import RowPaths
from services.client.state import Routing
from services.security.tls import client_ssl
from services.wire import ROW_DTYPES

T = TypeVar("T")
DEFAULT_CHUNK_BYTES = 8 << 20  # response bytes per Lookup message: one 64K-row bf16 reply, no reassembly copy
_MAP_MAY_HAVE_MOVED = frozenset({None, Reason.EPOCH_AHEAD})  # UNAVAILABLE reasons worth a slot-map refresh


class ShardClient(ShardLookups, ShardOps):
    def __init__(
        self,
        cfg: Config,
        *,
        epoch: int,
        owners: list[int],
        addresses: dict[int, str],
        control: Any = None,
        wire_dtype: str | None = None,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        channel_args: list[tuple[str, Any]] | tuple = (),
        row_path: str | None = None,
        host_id: str | None = None,
        shm_dir: str | None = None,
        replicas: list[list[int]] | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        """Standalone use: explicit slot map + addresses; with `control`, stale maps refresh.

        row_path / host_id / shm_dir default to cfg.cluster's (see row_paths.py); pass this
        process's own when `cfg` is the cluster's stored layout (`connect`). `security`: this
        process's certificates or token (default: cfg.security standalone, plaintext after
        `connect`, which never uses the stored layout's).
        """
        if len(owners) != cfg.cluster.num_slots:
            raise ValueError(f"owners: {len(owners)} entries, cluster.num_slots is {cfg.cluster.num_slots}")
        self.cfg = cfg
        self.control = control
        self.layouts: dict[int, TableLayout] = table_layouts(cfg.engram)
        self.wire_dtype = wire_dtype or cfg.cluster.wire_dtype
        self._dtype = wire.wire_dtype(self.wire_dtype)
        self._torch_dtype = ROW_DTYPES[self._dtype]  # of the rows as they travel (fp8: uint8 bytes, see dequant.py)
        for lay in self.layouts.values():  # a lookup may not ask for rows wider than the tables store
            check_wire_format(storage=cfg.engram.row_format, wire=self.wire_dtype, dim=lay.dim)
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.cluster.lookup_timeout_s)
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = cfg.cluster.max_message_mb << 20
        self.chunk_bytes = int(chunk_bytes)
        self._routing = Routing(
            epoch, np.asarray(owners, dtype=np.int64), dict(addresses), holder_matrix(list(owners), replicas)
        )
        sec = self.security = security if security is not None else cfg.security  # this process's identity
        self._pool = ChannelPool(
            [*channel_options(cfg.cluster.max_message_mb, keepalive_s=cfg.cluster.keepalive_s), *channel_args], sec
        )
        self._refresh_lock = asyncio.Lock()
        self.replica_switches = 0  # lookups sent again to another holder of their slots
        self._refreshed_at = 0.0
        self._bg: asyncio.Task[None] | None = None
        c = cfg.cluster
        self.row_paths = RowPaths(
            mode=row_path or c.row_path,
            host_id=c.host_id if host_id is None else host_id,
            shm_dir=shm_dir or c.shm_dir,
            retry=self.retry,
            tcp_ssl=client_ssl(sec),
            tcp_server_name=sec.server_name,
        )

    @classmethod
    def standalone(cls, cfg: Config, addresses: list[str], **kw: Any) -> ShardClient:
        """Shards started with `--standalone`: an even split of the slots over `addresses`, epoch 1."""
        if len(addresses) != cfg.cluster.num_shards:
            raise ValueError(f"addresses: {len(addresses)} given, cluster.num_shards is {cfg.cluster.num_shards}")
        owners = even_slot_map(cfg.cluster.num_slots, len(addresses))
        return cls(cfg, epoch=1, owners=owners, addresses=dict(enumerate(addresses)), **kw)

    @classmethod
    async def connect(cls, control: Any, **kw: Any) -> ShardClient:
        """Layout, slot map and shard addresses from the control plane."""
        cfg = await control.config()
        if kw.get("security") is None:  # the stored layout's security section is not this process's
            kw["security"] = SecurityConfig()
        smap = await control.slot_map()
        shards = await control.shards()
        addresses = {r.shard_id: r.address for r in sorted(shards, key=lambda r: r.alive)}  # alive wins
        client = cls(
            cfg,
            epoch=smap.epoch,
            owners=smap.owners,
            addresses=addresses,
            control=control,
            replicas=smap.replicas,
            **kw,
        )
        client.row_paths.update(shards)
        return client

    # ---------------------------------------------------------------------------------------
    # slot map

    @property
    def epoch(self) -> int:
        return self._routing.epoch

    @property
    def owners(self) -> list[int]:
        return self._routing.owners.tolist()

    @property
    def addresses(self) -> dict[int, str]:
        return dict(self._routing.addresses)

    @property
    def replicated(self) -> bool:
        return self._routing.holders is not None

    def set_routing(
        self,
        *,
        epoch: int,
        owners: list[int],
        addresses: dict[int, str] | None = None,
        replicas: list[list[int]] | None = None,
    ) -> None:
        if len(owners) != self.cfg.cluster.num_slots:
            raise ValueError(f"owners: {len(owners)} entries, cluster.num_slots is {self.cfg.cluster.num_slots}")
        addr = self._routing.addresses if addresses is None else dict(addresses)
        self._routing = Routing(epoch, np.asarray(owners, dtype=np.int64), addr, holder_matrix(list(owners), replicas))

    async def refresh(self) -> int:
        """Re-read the slot map and shard addresses from the control plane -> epoch."""
        if self.control is None:
            raise ShardError(
                Code.FAILED_PRECONDITION,
                "the slot map changed and this client has no control plane to refresh "
                "it from (standalone client: call set_routing)",
                call="refresh",
            )
        smap = await self.control.slot_map()
        shards = await self.control.shards()
        self._refreshed_at = asyncio.get_running_loop().time()
        addresses = {**self._routing.addresses, **{r.shard_id: r.address for r in shards if r.alive}}
        for r in shards:
            addresses.setdefault(r.shard_id, r.address)
        self.row_paths.update(shards)
        if smap.epoch >= self._routing.epoch:
            self.set_routing(epoch=smap.epoch, owners=smap.owners, addresses=addresses, replicas=smap.replicas)
        return self._routing.epoch

    def _keep_fresh(self) -> None:
        """Replicated: re-read the map in the background every heartbeat_s, so that reads which never
        fail (a dead shard's shared memory) move to the new primary soon after a failover."""
        if self.control is None or self._routing.holders is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() - self._refreshed_at < self.cfg.cluster.heartbeat_s or self._bg is not None:
            return

        async def bg() -> None:
            try:
                await self._newer_than(self._routing.epoch)
            except Exception:  # noqa: BLE001 - best effort; the next lookup tries again
                pass
            finally:
                self._bg = None

        self._refreshed_at = loop.time()
        self._bg = loop.create_task(bg())

    async def _newer_than(self, epoch: int) -> bool:
        """Make sure the routing is newer than `epoch` (one refresh for many waiters) -> moved?"""
        async with self._refresh_lock:
            if self._routing.epoch > epoch:
                return True
            try:
                await self.refresh()
            except ShardError:
                return False
            return self._routing.epoch > epoch

    # ---------------------------------------------------------------------------------------
    # one call with retries

    async def _call(
        self,
        shard_id: int,
        call: str,
        invoke: Callable[[Endpoint, float], Awaitable[T]],
        *,
        routing: Routing,
        deadline: float,
        idempotent: bool,
    ) -> T:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            address = routing.address(shard_id)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ShardError(
                    Code.DEADLINE_EXCEEDED,
                    f"no answer before the deadline ({attempt} attempts)",
                    address=address,
                    shard_id=shard_id,
                    call=call,
                )
            try:
                return await invoke(self._pool.get(address), remaining)
            except grpc.RpcError as exc:
                err = from_rpc_error(exc, address=address, shard_id=shard_id, call=call)
            attempt += 1
            if not idempotent or err.code not in RETRYABLE or attempt >= self.retry.max_attempts:
                raise err
            delay = self.retry.backoff(attempt)
            if loop.time() + delay >= deadline:
                raise err
            await asyncio.sleep(delay)
            if self.control is not None and err.code == Code.UNAVAILABLE and err.reason in _MAP_MAY_HAVE_MOVED:
                # the shard may have restarted on a new address (a transport failure has no reason), or
                # the map moved on (EPOCH_AHEAD); a staleness wait needs no new map
                await self._newer_than(routing.epoch)
                current = self._routing
                if current.epoch == routing.epoch:
                    routing = current

    async def close(self) -> None:
        if self._bg is not None:
            self._bg.cancel()
        self.row_paths.close()
        await self._pool.close()

    async def __aenter__(self) -> ShardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
