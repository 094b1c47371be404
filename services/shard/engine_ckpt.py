"""The shard's checkpoints: every owned (table, slot) to files, and an all-or-nothing restore.

A mixin of `ShardEngine` (engine.py: locks, the worker pool); each (table, slot) file keeps its
own applied step, which a restore puts back per slot (services/shard/ownership.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from engram.config import ClusterConfig
from engram.fileio import fsync_dir
from engram.layout import slot_num_rows
from proto.shard.v1 import shard_pb2
from services.shard import checkpoint as ckpt
from services.shard.errors import Code, Reason, ShardError, invalid, precondition
from services.shard.store import ShardStore

T = TypeVar("T")


class CheckpointOps:
    store: ShardStore
    limits: ClusterConfig
    admin: asyncio.Lock

    if TYPE_CHECKING:  # ShardEngine's

        async def _run(self, fn: Callable[..., T], *args, **kwargs) -> T: ...

        def _all_tables(self) -> contextlib.AbstractAsyncContextManager[None]: ...

    def _metas(self, table: int, slots: tuple[int, ...]) -> list[ckpt.SlotMeta]:
        store, layout = self.store, self.store.layouts[table]
        return [
            ckpt.SlotMeta(
                table,
                s,
                store.num_slots,
                slot_num_rows(layout.num_rows, s, store.num_slots),
                layout.dim,
                store.kind,
                store.row_format,
            )
            for s in slots
        ]

    async def checkpoint(self, req: shard_pb2.CheckpointRequest) -> shard_pb2.CheckpointResponse:
        """Every owned (table, slot) to checkpoint `name`; each table is written under its update lock."""
        directory = ckpt.checkpoint_dir(self.limits.checkpoint_dir, req.name)
        files = []
        async with self.admin, self._all_tables():
            view = self.store.view

            def write_all() -> None:
                for t in sorted(view.tables):
                    for meta in self._metas(t, view.owned):
                        files.append(ckpt.write_slot(directory, meta, self.store.slot_block(t, meta.slot, view)))
                    if view.owned:
                        fsync_dir(directory / f"table{t}")

            try:
                await self._run(write_all)
            except OSError as exc:
                raise ShardError(
                    Code.INTERNAL, f"checkpoint {req.name} failed: {exc.strerror or exc}", reason=Reason.INTERNAL
                ) from exc
        return shard_pb2.CheckpointResponse(files=[shard_pb2.SlotFile(**f) for f in files])

    async def restore(self, req: shard_pb2.RestoreRequest) -> shard_pb2.RestoreResponse:
        """All-or-nothing: every owned slot's file verified before any is loaded."""
        store = self.store
        directory = ckpt.checkpoint_dir(self.limits.checkpoint_dir, req.name)
        async with self.admin, self._all_tables():
            view = store.view
            wanted = {(t, s) for t in store.layouts for s in view.owned}
            by_key: dict[tuple[int, int], shard_pb2.SlotFile] = {}
            for f in req.files:
                if (f.table, f.slot) in by_key:
                    raise invalid(f"files: table {f.table} slot {f.slot} is listed twice")
                if (f.table, f.slot) in wanted:
                    by_key[(f.table, f.slot)] = f
            missing = sorted(wanted - set(by_key))
            if missing:
                raise precondition(
                    f"checkpoint {req.name} has no file for table {missing[0][0]} slot {missing[0][1]} "
                    f"({len(missing)} owned (table, slot) pairs missing); restore refused, tables unchanged",
                    Reason.CHECKPOINT_INVALID,
                )
            jobs = [(by_key[(m.table, m.slot)], m) for t in sorted(store.layouts) for m in self._metas(t, view.owned)]

            def verify_all() -> dict[tuple[int, int], int]:  # (table, slot) -> the step its file holds
                return {
                    (meta.table, meta.slot): ckpt.verify_slot(directory, f.path, f.sha256, meta=meta)
                    for f, meta in jobs
                }

            def load_all() -> None:
                for f, meta in jobs:
                    ckpt.load_slot(
                        directory, f.path, f.sha256, meta=meta, dst=store.slot_block(meta.table, meta.slot, view)
                    )

            try:
                steps = await self._run(verify_all)
                await self._run(store.rewrite_rows, load_all, steps)
            except OSError as exc:
                raise ShardError(
                    Code.DATA_LOSS,
                    f"reading checkpoint {req.name} failed: {exc.strerror or exc}",
                    reason=Reason.DATA_LOSS,
                ) from exc
        return shard_pb2.RestoreResponse(step=max(steps.values(), default=0), slots_restored=len(view.owned))
