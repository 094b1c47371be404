"""The client's non-lookup calls: gradient pushes, checkpoints, stats, health, slot moves.

A mixin of `ShardClient` (services/client/client.py), which provides `_routing`, `_call`,
`_newer_than`, `layout`, `control` and the limits.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from grpc_health.v1 import health_pb2

from proto.shard.v1 import shard_pb2
from services.client.errors import Code, ShardError
from services.client.replicas import apply_replicated
from services.client.routing import as_id_array, check_range, split_by_owner
from services.client.state import gather_or_cancel

ADMIN_TIMEOUT_S = 600.0  # checkpoints, restores and migrations move whole tables


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied_step: int  # lowest step fully applied to the table across the shards
    rows_updated: int
    pending: bool  # some shard waits for other parts of the step (sync mode)
    shards: dict[int, shard_pb2.ApplyGradientsResponse]


def _optimizer(optimizer: Any) -> shard_pb2.OptimizerParams:
    if isinstance(optimizer, shard_pb2.OptimizerParams):
        return optimizer
    if isinstance(optimizer, dict):
        try:
            return shard_pb2.OptimizerParams(**optimizer)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"optimizer: {exc} (fields: kind, lr, beta1, beta2, eps, version)") from None
    raise ValueError(f"optimizer: expected OptimizerParams or a dict, got {type(optimizer).__name__}")


def _grads(grads: Any, n: int, dim: int, table: int) -> torch.Tensor:
    g = torch.as_tensor(grads).detach().to(device="cpu", dtype=torch.float32).contiguous()
    if tuple(g.shape) != (n, dim):
        raise ValueError(f"grads: shape {tuple(g.shape)}, expected ({n}, {dim}) for {n} rows of table {table}")
    if n and not bool(torch.isfinite(g).all()):
        bad = torch.nonzero(~torch.isfinite(g).all(dim=1)).flatten()
        raise ValueError(f"grads: {bad.numel()} rows hold NaN/Inf (first: row index {int(bad[0])})")
    return g


def _one_per_slot(files: list[dict]) -> list[dict]:
    """Replicas report the same (table, slot) file: keep one; differing digests mean diverged copies."""
    seen: dict[tuple[int, int], dict] = {}
    for f in files:
        key = (int(f["table"]), int(f["slot"]))
        if key in seen and seen[key]["sha256"] != f["sha256"]:
            raise ShardError(
                Code.DATA_LOSS,
                f"replicas of table {key[0]} slot {key[1]} wrote different bytes "
                f"({seen[key]['sha256'][:12]} vs {f['sha256'][:12]}): the copies diverged",
                call="checkpoint",
            )
        seen.setdefault(key, f)
    return list(seen.values())


class ShardOps:
    # -----------------------------------------------------------------------------------------
    # gradients

    async def apply_gradients(
        self,
        table: int,
        row_ids: np.ndarray | torch.Tensor,
        grads: torch.Tensor | np.ndarray,
        *,
        step: int,
        optimizer: shard_pb2.OptimizerParams | dict,
        part_id: str = "",
        num_parts: int = 0,
        max_staleness: int = 0,
        timeout_s: float | None = None,
    ) -> ApplyResult:
        """Push summed gradients of distinct rows (U,) / (U, D) fp32 for optimizer step `step`.

        Every shard that owns slots gets its part (an empty one if none of its rows were
        touched), so sync-mode steps of `num_parts` parts complete on every shard. Not
        retried, except where a shard refused before touching state: after a stale slot map
        (FAILED_PRECONDITION: refresh, re-route) and while its slots migrate (UNAVAILABLE:
        back off until the new map is installed or the deadline passes).
        """
        layout = self.layout(table)
        if self.cfg.engram.row_format == "fp8":  # the shards refuse it too (FAILED_PRECONDITION)
            raise ValueError(
                f"apply_gradients: table {table} is stored as fp8 (E4M3 + UE8M0 scales), which is "
                "read-only; train an fp32 copy (engram.row_format=fp32)"
            )
        ids, shape = as_id_array(row_ids)
        if len(shape) != 1:
            raise ValueError(f"row_ids: expected a 1-D array of distinct rows, got shape {shape}")
        check_range(ids, layout.num_rows, table)
        s = np.sort(ids)
        dup = np.flatnonzero(s[1:] == s[:-1])
        if dup.size:
            raise ValueError(f"row_ids: row {int(s[dup[0]])} appears more than once; sum its gradients first")
        g = _grads(grads, ids.size, layout.dim, table)  # (U, D)
        opt = _optimizer(optimizer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        if self._routing.holders is not None:  # replicated slots: every holder gets the update
            applied = await apply_replicated(
                self,
                table=table,
                ids=ids,
                grads=g,
                step=step,
                opt=opt,
                part_id=part_id,
                num_parts=num_parts,
                max_staleness=max_staleness,
                deadline=deadline,
            )
            return ApplyResult(
                applied_step=min((r.applied_step for r in applied.values()), default=0),
                rows_updated=max((r.rows_updated for r in applied.values()), default=0),
                pending=any(r.pending for r in applied.values()),
                shards=applied,
            )
        applied = {}
        refreshes = waits = 0
        while True:
            routing = self._routing
            groups = {grp.shard: grp for grp in split_by_owner(ids, routing.owners)}
            clash = sorted(set(groups) & set(applied))
            if clash:
                raise ShardError(
                    Code.ABORTED,
                    f"the slot map changed to epoch {routing.epoch} while step {step} of table {table} "
                    f"was applied: shards {sorted(applied)} applied their part, and rows moved to shards {clash} "
                    "which already did; re-run the step",
                    call="ApplyGradients",
                )
            targets = sorted(set(groups) | (set(routing.owners.tolist()) - set(applied)))
            requests = {}
            for t in targets:
                grp = groups.get(t)
                t_ids = ids[:0] if grp is None else grp.ids
                t_g = g[:0] if grp is None else g if grp.positions is None else g[torch.from_numpy(grp.positions)]
                size = t_ids.nbytes + t_g.numel() * 4
                if size + (64 << 10) > self.max_message_bytes:
                    raise ValueError(
                        f"grads: {size} bytes for shard {t} exceed cluster.max_message_mb="
                        f"{self.max_message_bytes >> 20}; push fewer rows per call"
                    )
                requests[t] = shard_pb2.ApplyGradientsRequest(
                    table=table,
                    epoch=routing.epoch,
                    row_ids=t_ids.astype("<i8").tobytes(),
                    grads=t_g.numpy().tobytes(),
                    step=step,
                    optimizer=opt,
                    part_id=part_id,
                    num_parts=num_parts,
                    max_staleness=max_staleness,
                )
            outcomes = await asyncio.gather(
                *(self._apply_one(t, requests[t], routing, deadline) for t in targets), return_exceptions=True
            )
            retry_ids, retry_g, stale, busy, failure = [], [], None, None, None
            for t, out in zip(targets, outcomes, strict=True):
                if isinstance(out, ShardError) and out.code in (Code.FAILED_PRECONDITION, Code.UNAVAILABLE):
                    if out.code == Code.FAILED_PRECONDITION:
                        stale = out
                    else:
                        busy = out
                    if t in groups:
                        pos = groups[t].positions
                        retry_ids.append(groups[t].ids)
                        retry_g.append(g if pos is None else g[torch.from_numpy(pos)])
                elif isinstance(out, BaseException):
                    failure = failure or out
                else:
                    applied[t] = out
            if failure is not None:
                if applied and isinstance(failure, ShardError):
                    failure.add_note(f"shards {sorted(applied)} applied their part of step {step}")
                raise failure
            if stale is None and busy is None:
                return ApplyResult(
                    applied_step=min((r.applied_step for r in applied.values()), default=0),
                    rows_updated=sum(r.rows_updated for r in applied.values()),
                    pending=any(r.pending for r in applied.values()),
                    shards=applied,
                )
            if stale is not None:
                if refreshes >= self.retry.max_refreshes or not await self._newer_than(routing.epoch):
                    raise stale
                refreshes += 1
            else:
                assert busy is not None
                waits += 1
                delay = self.retry.backoff(waits)
                if loop.time() + delay >= deadline:
                    raise busy
                await asyncio.sleep(delay)
                if self.control is not None:
                    await self._newer_than(routing.epoch)  # the migration may have installed a new map meanwhile
            ids = np.concatenate(retry_ids) if retry_ids else ids[:0]
            g = torch.cat(retry_g) if retry_g else g[:0]

    async def _apply_one(self, shard_id, request, routing, deadline) -> shard_pb2.ApplyGradientsResponse:
        return await self._call(
            shard_id,
            "ApplyGradients",
            lambda ep, t: ep.stub.ApplyGradients(request, timeout=t),
            routing=routing,
            deadline=deadline,
            idempotent=False,
        )

    # -----------------------------------------------------------------------------------------
    # checkpoints

    async def checkpoint(
        self, name: str, step: int, *, extra: dict | None = None, timeout_s: float = ADMIN_TIMEOUT_S
    ) -> dict:
        """Every shard writes its slots as checkpoint `name` (under its cluster.checkpoint_dir; a name such
        as "run1/step_000100", never a path) -> manifest (also stored in the control plane).

        `extra`: more keys for the manifest (the trainer records its run id and worker count)."""
        if self.control is not None:
            await self.refresh()
        routing = self._routing
        deadline = asyncio.get_running_loop().time() + timeout_s
        request = shard_pb2.CheckpointRequest(name=str(name), step=step)
        targets = routing.shard_ids()  # replicas write the same bytes to the same paths; one entry each below
        replies = await gather_or_cancel(
            [
                self._call(
                    t,
                    "Checkpoint",
                    lambda ep, tmo: ep.stub.Checkpoint(request, timeout=tmo),
                    routing=routing,
                    deadline=deadline,
                    idempotent=True,
                )
                for t in targets
            ]
        )
        files = [
            {
                "table": f.table,
                "slot": f.slot,
                "path": f.path,
                "sha256": f.sha256,
                "num_rows": f.num_rows,
                "num_bytes": f.num_bytes,
            }
            for r in replies
            for f in r.files
        ]
        files = _one_per_slot(files)
        self._check_coverage(files, "checkpoint")
        manifest = {
            "step": int(step),
            "name": str(name),
            "num_slots": int(routing.owners.size),
            "epoch": routing.epoch,
            "files": sorted(files, key=lambda f: (f["table"], f["slot"])),
            "created": time.time(),
            **(extra or {}),
        }
        if self.control is not None:
            await self.control.put_manifest(manifest)
        return manifest

    def _check_coverage(self, files: list[dict], what: str) -> None:
        num_slots = self.cfg.cluster.num_slots
        seen: dict[tuple[int, int], int] = {}
        for f in files:
            key = (int(f["table"]), int(f["slot"]))
            seen[key] = seen.get(key, 0) + 1
        twice = [k for k, n in seen.items() if n > 1]
        missing = [
            (t, s)
            for t, lay in self.layouts.items()
            for s in range(num_slots)
            if (t, s) not in seen and s < lay.num_rows
        ]
        if twice or missing:
            raise ShardError(
                Code.DATA_LOSS,
                f"{what} does not cover every (table, slot) once: missing {missing[:8]}, duplicated {twice[:8]}",
                call=what,
            )

    async def restore(self, manifest: dict | None = None, *, timeout_s: float = ADMIN_TIMEOUT_S) -> dict:
        """Load a checkpoint (default: the control plane's latest) onto the current shards."""
        if manifest is None:
            if self.control is None:
                raise ValueError("restore: no manifest given and no control plane to read one from")
            manifest = await self.control.latest_manifest()
            if manifest is None:
                raise ValueError("restore: the control plane holds no checkpoint manifest")
        if not isinstance(manifest.get("name"), str):
            raise ValueError(
                "manifest: no checkpoint 'name' (one written before checkpoints were named by a path: "
                "copy its folder under the shards' cluster.checkpoint_dir and set 'name' to where)"
            )
        if int(manifest.get("num_slots", -1)) != self.cfg.cluster.num_slots:
            raise ValueError(
                f"manifest: written for {manifest.get('num_slots')} slots, the cluster has {self.cfg.cluster.num_slots}"
            )
        self._check_coverage(manifest["files"], "manifest")
        if self.control is not None:
            await self.refresh()
        routing = self._routing
        per_shard: dict[int, list[shard_pb2.SlotFile]] = {}
        for f in manifest["files"]:
            slot = int(f["slot"])
            holders = (
                [int(routing.owners[slot])]
                if routing.holders is None
                else [int(h) for h in routing.holders[slot] if h >= 0]
            )
            for owner in holders:
                per_shard.setdefault(owner, []).append(
                    shard_pb2.SlotFile(
                        **{k: f[k] for k in ("table", "slot", "path", "sha256", "num_rows", "num_bytes")}
                    )
                )
        deadline = asyncio.get_running_loop().time() + timeout_s
        targets = sorted(per_shard)
        replies = await gather_or_cancel(
            [
                self._call(
                    t,
                    "Restore",
                    lambda ep, tmo, t=t: ep.stub.Restore(
                        shard_pb2.RestoreRequest(name=manifest["name"], files=per_shard[t]), timeout=tmo
                    ),
                    routing=routing,
                    deadline=deadline,
                    idempotent=True,
                )
                for t in targets
            ]
        )
        steps = sorted({int(r.step) for r in replies})
        if steps != [int(manifest["step"])]:
            raise ShardError(
                Code.DATA_LOSS,
                f"restore of the step {manifest['step']} checkpoint: the shards report steps {steps}",
                call="Restore",
            )
        return {"step": int(manifest["step"]), "slots_restored": sum(r.slots_restored for r in replies)}

    # -----------------------------------------------------------------------------------------
    # training: applied steps, whole tables, half-collected steps

    async def applied_steps(self, *, timeout_s: float = 10.0) -> dict[int, int]:
        """{table: oldest applied_step over the shards that own slots}."""
        if self._routing.holders is not None and self.control is not None:
            await self.refresh()  # replicated: a failed-over holder is not asked
        stats = await self.stats(self._routing.shard_ids(), timeout_s=timeout_s)
        out: dict[int, int] = {}
        for st in stats.values():
            for t in st.tables:
                out[t.table] = min(out.get(t.table, t.applied_step), t.applied_step)
        return out

    async def wait_applied(self, step: int, *, timeout_s: float = 120.0) -> dict[int, int]:
        """Wait until every table on every slot-owning shard has applied `step` -> {table: applied}."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + timeout_s, 5e-4
        while True:
            applied = await self.applied_steps()
            if min(applied.values(), default=step) >= step:
                return applied
            if loop.time() > deadline:
                raise TimeoutError(f"shards did not apply step {step} in {timeout_s:g} s (applied: {applied})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def pull_table(self, table: int, *, chunk_rows: int = 1 << 16) -> torch.Tensor:
        """The whole table (R, D) fp32, read back from the shards (exact: an fp32 lookup)."""
        if self.wire_dtype != "fp32":
            sibling = type(self)(
                self.cfg,
                epoch=self.epoch,
                owners=self.owners,
                addresses=self.addresses,
                control=self.control,
                wire_dtype="fp32",
                timeout_s=self.timeout_s,
            )
            try:
                return await sibling.pull_table(table, chunk_rows=chunk_rows)
            finally:
                await sibling.close()
        n = self.layout(table).num_rows
        handles = [
            self.lookup(table, np.arange(a, min(n, a + chunk_rows)), dedup_ids=False) for a in range(0, n, chunk_rows)
        ]
        return torch.cat([(await h).float() for h in handles])  # (R, D)

    async def discard_pending(self, num_parts: int, *, timeout_s: float = 60.0) -> int:
        """Complete every half-collected step with empty parts -> how many parts were taken.

        A trainer that died mid-step can leave a step waiting for the parts of dead workers,
        and a shard refuses Restore while a step is pending. Right before a restore (which
        overwrites rows, optimizer state and applied_step) such a step is harmless to finish:
        each shard gets empty parts 0..num_parts-1 of its next step; the parts it already holds
        are refused (FAILED_PRECONDITION) and ignored.
        """
        routing = self._routing
        owners = routing.shard_ids()
        stats = await self.stats(owners, timeout_s=timeout_s)
        opt = shard_pb2.OptimizerParams(
            kind=self.cfg.cluster.optimizer, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, version=1
        )
        deadline = asyncio.get_running_loop().time() + timeout_s
        sent = 0
        for sid in owners:
            for t in stats[sid].tables:
                for part in range(num_parts):
                    req = shard_pb2.ApplyGradientsRequest(
                        table=t.table,
                        epoch=routing.epoch,
                        row_ids=b"",
                        grads=b"",
                        step=t.applied_step + 1,
                        optimizer=opt,
                        part_id=str(part),
                        num_parts=num_parts,
                    )
                    try:
                        await self._apply_one(sid, req, routing, deadline)
                        sent += 1
                    except ShardError as exc:
                        if exc.code != Code.FAILED_PRECONDITION:
                            raise
        return sent

    # -----------------------------------------------------------------------------------------
    # admin

    async def stats(
        self, shard_ids: list[int] | None = None, *, timeout_s: float = 5.0, errors: str = "raise"
    ) -> dict[int, Any]:
        """shard id -> StatsResponse (or the ShardError, with errors="return")."""
        return await self._each(
            shard_ids,
            "Stats",
            lambda ep, t: ep.stub.Stats(shard_pb2.StatsRequest(), timeout=t),
            timeout_s=timeout_s,
            errors=errors,
        )

    async def health(self, shard_ids: list[int] | None = None, *, timeout_s: float = 5.0) -> dict[int, str]:
        """shard id -> "SERVING" / "NOT_SERVING" / ... or "ERROR: <what>"."""
        out = await self._each(
            shard_ids,
            "Health.Check",
            lambda ep, t: ep.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=t),
            timeout_s=timeout_s,
            errors="return",
        )
        return {
            k: (
                f"ERROR: {v}"
                if isinstance(v, Exception)
                else health_pb2.HealthCheckResponse.ServingStatus.Name(v.status)
            )
            for k, v in out.items()
        }

    async def _each(self, shard_ids, call, invoke, *, timeout_s: float, errors: str) -> dict[int, Any]:
        if errors not in ("raise", "return"):
            raise ValueError(f"errors: 'raise' or 'return', got {errors!r}")
        routing = self._routing
        ids = sorted(routing.addresses) if shard_ids is None else list(shard_ids)
        deadline = asyncio.get_running_loop().time() + timeout_s
        outs = await asyncio.gather(
            *(self._call(i, call, invoke, routing=routing, deadline=deadline, idempotent=True) for i in ids),
            return_exceptions=True,
        )
        for out in outs:
            if isinstance(out, BaseException) and (errors == "raise" or not isinstance(out, ShardError)):
                raise out
        return dict(zip(ids, outs, strict=True))

    async def migrate_slots(
        self, source: int, slots: list[int], target_address: str, *, epoch: int, timeout_s: float = ADMIN_TIMEOUT_S
    ) -> shard_pb2.MigrateSlotsResponse:
        request = shard_pb2.MigrateSlotsRequest(slots=slots, target=target_address, epoch=epoch)
        deadline = asyncio.get_running_loop().time() + timeout_s
        return await self._call(
            source,
            "MigrateSlots",
            lambda ep, t: ep.stub.MigrateSlots(request, timeout=t),
            routing=self._routing,
            deadline=deadline,
            idempotent=False,
        )

    async def set_slot_map_on(
        self, shard_id: int, *, epoch: int, owned_slots: list[int], timeout_s: float = 60.0
    ) -> shard_pb2.SetSlotMapResponse:
        request = shard_pb2.SetSlotMapRequest(epoch=epoch, owned_slots=owned_slots)
        deadline = asyncio.get_running_loop().time() + timeout_s
        return await self._call(
            shard_id,
            "SetSlotMap",
            lambda ep, t: ep.stub.SetSlotMap(request, timeout=t),
            routing=self._routing,
            deadline=deadline,
            idempotent=True,
        )


__all__ = ["ApplyResult", "ShardOps"]
