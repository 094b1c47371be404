"""`ShardClient`: batched, deduplicated, concurrent lookups and gradient pushes to the shards.

    client = await ShardClient.connect(ControlPlane.connect(url, ns))
    handle = client.lookup(table, ids)          # dedup -> split by slot owner -> chunk -> send
    rows = await handle                          # (*ids.shape, D) in request order
    await client.apply_gradients(table, uniq_ids, grads, step=s, optimizer=opt)

Phases of a lookup (all on the caller's event loop; the numpy work is O(N) vectorised):
  1. dedup (routing.dedup), 2. split unique ids by slot owner, 3. cut each shard's ids into
  messages under the size limit, 4. one Lookup per message, all concurrent, under one
  deadline, 5. rows land in (U, D) at their positions, 6. `await handle` expands by inverse.
A small lookup (<= 1 MiB of rows) whose shards are all mapped from shared memory skips 3-5:
`lookup()` reads the rows in place right away and returns a finished handle (no task).

Failures: UNAVAILABLE is retried with backoff for idempotent calls; FAILED_PRECONDITION
refreshes the slot map from the control plane and, if the epoch moved, re-routes the ids
of the failed message; anything else is raised as one `ShardError`.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from opentelemetry import trace as otel_trace

from engram.config import Config, SecurityConfig
from engram.layout import TableLayout, even_slot_map, table_layouts
from engram.row_format import check_wire_format
from services import telemetry, wire
from services.client.channels import ChannelPool, Endpoint, channel_options
from services.client.codec import encode_lookup_request
from services.client.errors import RETRYABLE, Code, Reason, RetryPolicy, ShardError, from_rpc_error
from services.client.handle import LookupHandle
from services.client.ops import ShardOps
from services.client.replicas import SWITCH_CODES, alternate_owners, holder_matrix
from services.client.routing import (
    Dedup,
    as_id_array,
    assemble,
    check_range,
    chunk_groups,
    dedup,
    max_rows_per_message,
    slot_of,
    split_by_owner,
    void_rows,
)
from services.client.row_paths import INLINE_SHM_BYTES, RowPaths
from services.client.state import Routing, gather_or_cancel
from services.security.tls import client_ssl
from services.telemetry import traced_task
from services.wire import ROW_DTYPES, TORCH_DTYPES, row_bytes, row_cols

T = TypeVar("T")
DEFAULT_CHUNK_BYTES = 8 << 20  # response bytes per Lookup message: one 64K-row bf16 reply, no reassembly copy
_MAP_MAY_HAVE_MOVED = frozenset({None, Reason.EPOCH_AHEAD})  # UNAVAILABLE reasons worth a slot-map refresh


class ShardClient(ShardOps):
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
        sec = security if security is not None else cfg.security
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

    # ---------------------------------------------------------------------------------------
    # lookups

    def layout(self, table: int) -> TableLayout:
        try:
            return self.layouts[table]
        except KeyError:
            raise ValueError(f"table {table}: no such Engram table (layers {sorted(self.layouts)})") from None

    def lookup(
        self,
        table: int,
        row_ids: np.ndarray | torch.Tensor,
        *,
        upcast: bool = False,
        timeout_s: float | None = None,
        dedup_ids: bool = True,
        step: int = 0,
        max_staleness: int = 0,
    ) -> LookupHandle:
        """Issue a lookup of any-shape int ids now -> handle; `await handle` -> (*shape, D).

        `dedup_ids=False` skips the duplicate check (ids already distinct, e.g. the worker's
        unique ids); duplicates are still answered correctly, each sent once per occurrence.
        Training lookups pass the 1-based `step` they are for: a shard that has applied fewer
        than `step - 1 - max_staleness` steps refuses (UNAVAILABLE, retried until the deadline).
        `handle.applied_step` is then the oldest applied step among the shards that answered.
        """
        if step < 0 or max_staleness < 0:
            raise ValueError(f"step {step} / max_staleness {max_staleness}: must be >= 0")
        layout = self.layout(table)
        flat, shape = as_id_array(row_ids)  # (N,)
        check_range(flat, layout.num_rows, table)
        d = dedup(flat, shape) if dedup_ids else Dedup(unique=flat, inverse=None, shape=shape)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("ShardClient.lookup must be called from a running event loop") from None
        t0 = time.time_ns()
        now = self._read_now(table, d.unique, step=step, max_staleness=max_staleness)
        if now is not None:  # read in place already: a finished handle, no task, no loop round
            landed = loop.create_future()
            landed.set_result(now)
            span = self._inline_span(t0, table=table, rows=int(d.unique.size), ids=int(flat.size))
            return LookupHandle(table=table, dedup=d, task=landed, upcast=upcast, span=span, dim=layout.dim)
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        task, span = traced_task(  # span "lookup": issue -> rows landed; the per-shard RPC spans are its children
            self._gather(table, d.unique, deadline, self.retry.max_refreshes, step=step, max_staleness=max_staleness),
            "lookup",
            table=table,
            rows=int(d.unique.size),
            ids=int(flat.size),
            epoch=self._routing.epoch,
            unique_ratio=round(d.unique.size / max(1, flat.size), 4),
        )
        return LookupHandle(
            table=table, dedup=d, task=task, upcast=upcast, span=span, dim=layout.dim, fp8=self.wire_dtype == "fp8"
        )

    def _read_now(
        self, table: int, ids: np.ndarray, *, step: int, max_staleness: int, open_files: bool = True
    ) -> tuple[torch.Tensor, int | None] | None:
        """(U,) distinct ids -> ((U, D) rows, oldest applied step) read from shared memory on this
        thread, when every shard of a small lookup (<= INLINE_SHM_BYTES) is mapped here and each
        read succeeds at once; else None and the lookup goes the async way (row_paths.py)."""
        dim = self.layouts[table].dim
        if self._dtype not in TORCH_DTYPES or not ids.size or ids.size * row_bytes(self._dtype, dim) > INLINE_SHM_BYTES:
            return None  # fp8 rows are not in shared memory
        if self.row_paths.mode not in ("auto", "shm"):
            return None
        routing = self._routing
        out = torch.empty((ids.size, dim), dtype=self._torch_dtype)  # (U, D)
        applied: int | None = None
        for g in split_by_owner(ids, routing.owners):
            address = routing.addresses.get(g.shard)
            part = out if g.positions is None else torch.empty((g.ids.size, dim), dtype=self._torch_dtype)  # (n, D)
            got = (
                None
                if not address
                else self.row_paths.read_now(
                    address=address,
                    table=table,
                    ids=g.ids,
                    out=part,
                    epoch=routing.epoch,
                    step=step,
                    max_staleness=max_staleness,
                    open_files=open_files,
                )
            )
            if got is None:
                return None
            if g.positions is not None:
                np.put(void_rows(out), g.positions, void_rows(part))
            applied = got if applied is None else min(applied, got)
        return out, applied

    def read_now(
        self, table: int, row_ids: np.ndarray | torch.Tensor, *, step: int = 0, max_staleness: int = 0
    ) -> tuple[torch.Tensor, int | None] | None:
        """For a thread other than the client's loop (SyncShardClient): (U,) distinct ids -> ((U, D)
        rows in the wire dtype, oldest applied step) from shared memory now, or None (then call
        `lookup` on the loop). Only reads; shared-memory files are opened by loop-side lookups."""
        flat, _ = as_id_array(row_ids)  # (U,)
        check_range(flat, self.layout(table).num_rows, table)
        t0 = time.time_ns()
        now = self._read_now(table, flat, step=step, max_staleness=max_staleness, open_files=False)
        if now is not None:
            self._inline_span(t0, table=table, rows=int(flat.size), ids=int(flat.size))
        return now

    @staticmethod
    def _inline_span(t0_ns: int, *, table: int, rows: int, ids: int) -> Any:
        """The "lookup" span and client metrics of a lookup already read from shared memory."""
        telemetry.record_lookup((time.time_ns() - t0_ns) * 1e-9, rows, side="client", table=table)
        if not telemetry.enabled():
            return otel_trace.INVALID_SPAN
        sp = telemetry.tracer().start_span(
            "lookup", start_time=t0_ns, attributes={"table": table, "rows": rows, "ids": ids, "row_path": "shm"}
        )
        sp.end()
        return sp

    def _chunk_rows(self, dim: int) -> int:
        width = row_bytes(self._dtype, dim)
        limit = max_rows_per_message(dim=width, itemsize=1, max_message_bytes=self.max_message_bytes)
        return max(1, min(limit, self.chunk_bytes // width))

    async def _gather(
        self, table: int, ids: np.ndarray, deadline: float, refreshes: int, *, step: int = 0, max_staleness: int = 0
    ) -> tuple[torch.Tensor, int | None]:
        """(n,) distinct ids -> ((n, D) rows in the wire dtype in the order of `ids` (fp8: (n, D + D/32)
        bytes, dequantised by the handle), oldest applied_step of the shards asked, None if none was)."""
        dim = self.layouts[table].dim
        self._keep_fresh()
        routing = self._routing
        chunks = chunk_groups(split_by_owner(ids, routing.owners), self._chunk_rows(dim))
        parts = await gather_or_cancel(
            [
                self._lookup_chunk(
                    table, c.shard, c.ids, routing, deadline, refreshes, step=step, max_staleness=max_staleness
                )
                for c in chunks
            ]
        )
        applied = min((a for _, a in parts if a is not None), default=None)
        rows = assemble(
            ids.size,
            row_cols(self._dtype, dim),
            self._torch_dtype,
            parts=[(c.positions, p) for c, (p, _) in zip(chunks, parts)],
        )
        return rows, applied

    async def _lookup_chunk(
        self,
        table: int,
        shard_id: int,
        ids: np.ndarray,
        routing: Routing,
        deadline: float,
        refreshes: int,
        *,
        step: int = 0,
        max_staleness: int = 0,
        tried: frozenset[int] = frozenset(),
    ) -> tuple[torch.Tensor, int | None]:
        """-> ((n, D) rows, the applied step): from `shard_id`, or, with replicas, from the next holder of
        the slots when it fails or does not answer in cluster.replica_switch_s (services/client/replicas.py)."""
        if routing.holders is None:
            return await self._lookup_on(
                table, shard_id, ids, routing, deadline, refreshes, step=step, max_staleness=max_staleness
            )
        loop = asyncio.get_running_loop()
        tried = tried | {shard_id}
        alt = alternate_owners(routing.holders, set(tried))  # (S,) next holder per slot, -1 if none left
        alt_of_ids = alt[slot_of(ids, alt.shape[0])]  # (n,)
        can_switch = bool(ids.size) and bool((alt_of_ids >= 0).all())
        budget = min(deadline - loop.time(), self.cfg.cluster.replica_switch_s)
        try:
            return await asyncio.wait_for(
                self._lookup_on(  # no retries here: the next holder is the retry
                    table,
                    shard_id,
                    ids,
                    routing,
                    deadline,
                    refreshes,
                    step=step,
                    max_staleness=max_staleness,
                    retry=False,
                ),
                budget,
            )
        except TimeoutError:
            err = ShardError(
                Code.DEADLINE_EXCEEDED,
                f"no answer in {budget:.2f} s (cluster.replica_switch_s)",
                address=routing.addresses.get(shard_id, ""),
                shard_id=shard_id,
                call="Lookup",
            )
        except ShardError as exc:
            err = exc
        if err.code not in SWITCH_CODES or loop.time() >= deadline:
            raise err
        if not can_switch:
            # no other holder in this map: a newer one may list one (failover, repair); else keep waiting here
            try:
                moved = refreshes > 0 and await self._newer_than(routing.epoch)
            except Exception:  # noqa: BLE001 - the control plane is down: this shard is all we know
                moved = False
            if moved:
                return await self._gather(table, ids, deadline, refreshes - 1, step=step, max_staleness=max_staleness)
            return await self._lookup_on(
                table, shard_id, ids, routing, deadline, refreshes, step=step, max_staleness=max_staleness
            )
        self.replica_switches += 1
        dim = self.layouts[table].dim
        groups = split_by_owner(ids, alt)
        parts = await gather_or_cancel(
            [
                self._lookup_chunk(
                    table,
                    g.shard,
                    g.ids,
                    routing,
                    deadline,
                    refreshes,
                    step=step,
                    max_staleness=max_staleness,
                    tried=tried,
                )
                for g in groups
            ]
        )
        applied = min((a for _, a in parts if a is not None), default=None)
        placed = [(slice(0, ids.size) if g.positions is None else g.positions, p) for g, (p, _) in zip(groups, parts)]
        return assemble(ids.size, dim, self._torch_dtype, parts=placed), applied

    async def _lookup_on(
        self,
        table: int,
        shard_id: int,
        ids: np.ndarray,
        routing: Routing,
        deadline: float,
        refreshes: int,
        *,
        step: int = 0,
        max_staleness: int = 0,
        retry: bool = True,
    ) -> tuple[torch.Tensor, int | None]:
        """-> ((n, D) rows, the shard's applied step): shared memory, TCP data plane or gRPC (row_paths.py)."""
        dim = self.layouts[table].dim
        try:
            address = routing.addresses.get(shard_id)
            fast = (
                None
                if not address
                else await self.row_paths.lookup(
                    shard_id=shard_id,
                    address=address,
                    table=table,
                    ids=ids,
                    dtype=self._dtype,
                    dim=dim,
                    epoch=routing.epoch,
                    step=step,
                    max_staleness=max_staleness,
                    deadline=deadline,
                )
            )
            if fast is not None:
                return fast
            self.row_paths.used["grpc"] += 1
            request = encode_lookup_request(
                table=table, epoch=routing.epoch, row_ids=ids, dtype=self._dtype, step=step, max_staleness=max_staleness
            )
            reply = await self._call(
                shard_id,
                "Lookup",
                lambda ep, t: ep.lookup_raw(request, timeout=t),
                routing=routing,
                deadline=deadline,
                idempotent=retry,
            )
        except ShardError as err:
            if err.code == Code.FAILED_PRECONDITION and refreshes > 0 and await self._newer_than(routing.epoch):
                return await self._gather(table, ids, deadline, refreshes - 1, step=step, max_staleness=max_staleness)
            raise
        n = ids.size
        if reply.dtype != self._dtype or reply.dim != dim or len(reply.rows) != n * row_bytes(self._dtype, dim):
            raise ShardError(
                Code.INTERNAL,
                f"malformed reply: {len(reply.rows)} bytes, dim {reply.dim}, dtype {reply.dtype} for {n} rows of "
                f"{dim} dims in dtype {self._dtype}",
                address=routing.addresses.get(shard_id, ""),
                shard_id=shard_id,
                call="Lookup",
            )
        with warnings.catch_warnings():  # the buffer is the received message, owned by this tensor alone
            warnings.simplefilter("ignore", UserWarning)
            rows = torch.frombuffer(reply.rows, dtype=self._torch_dtype)
            return rows.view(n, row_cols(self._dtype, dim)), reply.applied_step  # (n, D); fp8: (n, D + D/32)

    async def close(self) -> None:
        if self._bg is not None:
            self._bg.cancel()
        self.row_paths.close()
        await self._pool.close()

    async def __aenter__(self) -> ShardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
