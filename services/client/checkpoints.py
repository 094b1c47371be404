"""Checkpoints and restores of the shards' tables, and the manifest that lists their files.

A mixin of `ShardClient` (services/client/client.py), which provides `_routing`, `_call`,
`refresh`, `control`, `layouts` and `cfg`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from proto.shard.v1 import shard_pb2
from services.client.base import ClientBase
from services.client.errors import Code, Reason, ShardError
from services.client.state import gather_or_cancel

if TYPE_CHECKING:
    from services.client.channels import Endpoint

ADMIN_TIMEOUT_S = 600.0  # checkpoints, restores and migrations move whole tables


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
                reason=Reason.DATA_LOSS,
            )
        seen.setdefault(key, f)
    return list(seen.values())


class CheckpointOps(ClientBase):
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
                reason=Reason.DATA_LOSS,
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
        requests = {t: shard_pb2.RestoreRequest(name=manifest["name"], files=per_shard[t]) for t in targets}

        def restore_on(t: int) -> Callable[[Endpoint, float], Awaitable[shard_pb2.RestoreResponse]]:
            return lambda ep, tmo: ep.stub.Restore(requests[t], timeout=tmo)

        replies = await gather_or_cancel(
            [
                self._call(
                    t,
                    "Restore",
                    restore_on(t),
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
                reason=Reason.DATA_LOSS,
            )
        return {"step": int(manifest["step"]), "slots_restored": sum(r.slots_restored for r in replies)}
