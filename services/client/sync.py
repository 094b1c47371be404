"""`SyncShardClient`: the `ShardClient` for synchronous callers (the trainer's Ray workers and driver).

A thin facade: the async client lives on its own event-loop thread (`LoopThread`); calls that
the caller may overlap with its own work return a `concurrent.futures.Future`, the rest block.

    shards = SyncShardClient.connect(cfg)                       # slot map + addresses from Redis
    fut = shards.lookup(table, ids, step=s, max_staleness=0)    # requests leave now
    rows, applied = fut.result()                                # (U, D) fp32, oldest applied step
    shards.push(table, ids, grads, step=s, optimizer=opt, part_id="0", num_parts=2).result()
    shards.checkpoint(name, step) / restore(manifest) / pull_table(table) / wait_applied(step)

Slot-map changes (a rebalance) are handled inside the client: stale epochs refresh and
re-route, migrating slots are retried until the new map is installed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

import numpy as np
import torch

from engram.config import Config
from services.client.client import ShardClient
from services.client.errors import Code, Reason, ShardError
from services.client.loop import LoopThread
from services.client.ops import ApplyResult
from services.control.liveness import ShardSilent, while_alive

T = TypeVar("T")


class SyncShardClient:
    def __init__(self, client: ShardClient, loop: LoopThread) -> None:
        self.client, self._loop = client, loop

    @classmethod
    def connect(cls, cfg: Config, *, wire_dtype: str | None = None, timeout_s: float | None = None) -> SyncShardClient:
        """The cluster of `cfg.cluster` (redis_url, namespace); every shard owning slots must be alive."""
        from services.control.store import ControlPlane

        c = cfg.cluster
        loop = LoopThread("engram-shards")

        async def open_client() -> ShardClient:
            control = ControlPlane.from_config(cfg)
            try:
                client = await ShardClient.connect(
                    control,
                    wire_dtype=wire_dtype or c.wire_dtype,
                    timeout_s=timeout_s,
                    row_path=c.row_path,
                    host_id=c.host_id,
                    shm_dir=c.shm_dir,
                    security=cfg.security,
                )
                alive = {r.shard_id for r in await control.shards() if r.alive}
            except BaseException:
                await control.close()
                raise
            missing = sorted(set(client.owners) - alive) if not client.replicated else []
            if missing:
                await client.close()
                await control.close()
                raise RuntimeError(
                    f"cluster {c.namespace!r} at {c.redis_url}: shards {missing} own slots but are not alive; "
                    "start them (engram up) before training"
                )
            return client

        try:
            return cls(loop.call(open_client()), loop)
        except BaseException:
            loop.close()
            raise

    def submit(self, coro: Coroutine[Any, Any, T]) -> cf.Future[T]:
        """Run `coro` on the client's loop in the caller's context (its current trace span is the parent)."""
        ctx = contextvars.copy_context()

        async def in_callers_context() -> T:
            return await self._watched(asyncio.get_running_loop().create_task(coro, context=ctx))

        return self._loop.submit(in_callers_context())

    def call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        return self._loop.call(self._watched(coro), timeout)

    async def _watched(self, awaitable: Awaitable[T]) -> T:
        """A stopped or hung shard ends the wait once its heartbeat key expires, not at the deadline."""
        control = self.client.control
        if control is None or self.client.replicated:  # replicated: the client moves to another holder itself
            return await awaitable
        c = self.client.cfg.cluster
        try:
            return await while_alive(
                awaitable,
                control=control,
                shard_ids=lambda: set(self.client.owners),
                check_every_s=max(0.5, min(2.0, c.heartbeat_ttl_s / 2)),
            )
        except ShardSilent as silent:
            raise ShardError(
                Code.UNAVAILABLE,
                f"the shard stopped heartbeating (no beat for over {c.heartbeat_ttl_s:g} s, "
                "cluster.heartbeat_ttl_s) while the call waited: it is stopped, hung or cut off",
                address=silent.address,
                shard_id=silent.shard_id,
                call="a call",
                reason=Reason.SHARD_DOWN,
            ) from None

    # ---------------------------------------------------------------------------------------
    # rows

    def lookup(
        self, table: int, ids: np.ndarray, *, step: int = 0, max_staleness: int = 0, timeout_s: float | None = None
    ) -> cf.Future[tuple[torch.Tensor, int | None]]:
        """(U,) distinct int64 rows -> future of ((U, D) fp32 rows, oldest applied_step of the shards asked).

        Rows mapped from shared memory are read on the calling thread (a finished future, no
        hop to the loop thread) when the whole lookup can be read at once; the rest go on the loop."""
        done: cf.Future[tuple[torch.Tensor, int | None]] = cf.Future()
        try:
            now = self.client.read_now(table, ids, step=step, max_staleness=max_staleness)
        except Exception as exc:  # bad ids: raised from the future, as on the loop
            done.set_exception(exc)
            return done
        if now is not None:
            rows, applied = now  # (U, D) wire dtype, this call's own tensor
            done.set_result((rows.float(), applied))
            return done

        async def go() -> tuple[torch.Tensor, int | None]:
            handle = self.client.lookup(
                table, ids, dedup_ids=False, step=step, max_staleness=max_staleness, timeout_s=timeout_s
            )
            rows = await handle.unique_rows()  # (U, D) wire dtype, may share the received message
            return rows.to(torch.float32, copy=True), handle.applied_step  # the caller's own, writable

        return self.submit(go())

    def push(
        self,
        table: int,
        ids: np.ndarray,
        grads: torch.Tensor,
        *,
        step: int,
        optimizer: Any,
        part_id: str = "",
        num_parts: int = 0,
        max_staleness: int = 0,
        timeout_s: float | None = None,
    ) -> cf.Future[ApplyResult]:
        """Summed gradients (U,), (U, D) fp32 of 1-based `step` -> future of the shards' ApplyResult."""
        return self.submit(
            self.client.apply_gradients(
                table,
                ids,
                grads,
                step=step,
                optimizer=optimizer,
                part_id=part_id,
                num_parts=num_parts,
                max_staleness=max_staleness,
                timeout_s=timeout_s,
            )
        )

    def applied_steps(self) -> dict[int, int]:
        return self.call(self.client.applied_steps())

    def wait_applied(self, step: int, *, timeout_s: float = 120.0) -> dict[int, int]:
        return self.call(self.client.wait_applied(step, timeout_s=timeout_s))

    def pull_table(self, table: int) -> torch.Tensor:
        """(R, D) fp32: the whole table."""
        return self.call(self.client.pull_table(table))

    # ---------------------------------------------------------------------------------------
    # admin

    def checkpoint(self, name: str, step: int, *, extra: dict | None = None) -> dict:
        """Checkpoint `name` under the shards' cluster.checkpoint_dir (a name, never a path)."""
        return self.call(self.client.checkpoint(name, step, extra=extra))

    def restore(self, manifest: dict) -> int:
        return int(self.call(self.client.restore(manifest))["step"])

    def discard_pending(self, num_parts: int) -> int:
        return self.call(self.client.discard_pending(num_parts))

    def stats(self) -> dict[int, Any]:
        return self.call(self.client.stats())

    def close(self) -> None:
        try:
            control = self.client.control
            self.call(self.client.close(), timeout=30)
            if control is not None:
                self.call(control.close(), timeout=30)
        finally:
            self._loop.close()

    def __enter__(self) -> SyncShardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
