"""The trainer's view of the memory shards: a small synchronous row store over gRPC.

A Ray Train worker is a plain (non-async) Python process, so this adapter talks to the shards
with sync gRPC stubs and `.future()` calls (one RPC per shard in flight at once). It routes
global rows by the cluster's slot map (row -> slot = row % num_slots -> shard), and every
push goes to *every* shard (with no rows where a shard owns none of them), so that each
shard sees every part of every step and advances its `applied_step` in lock step.

    lookup(table, ids (U,))            -> rows fp32 (U, dh), min applied_step over the shards asked
    applied_steps()                    -> {table: min applied_step over all shards}
    push(table, ids (U,), grads (U,dh), step=..)  -> applied_step (min over shards) and pending flag
    checkpoint(directory, step)        -> manifest dict (also written to the control plane)
    restore(manifest)                  -> step restored
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from engram.config import Config
from engram.row_optim import AdamParams
from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.client.errors import ShardError
from services.control.liveness import ShardSilent, heartbeat_alive, result_while_alive
from services.control.store import ControlPlane
from services.wire import pack_ids, pack_rows, unpack_rows, wire_dtype

_MAX_LOOKUP_ROWS = 1 << 16  # rows per Lookup message when pulling whole tables


class ShardRequestError(ShardError):
    """A shard refused a request, or stopped heartbeating during it; names the shard, the call and the reason.

    Picklable (services.client.errors.ShardError): it reaches the Ray driver with its cause.
    """


@dataclass(frozen=True, slots=True)
class PushResult:
    applied_step: int  # min over shards of the last step applied to the table
    pending: bool  # some shard is still collecting other workers' parts of this step


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


class ShardRows:
    def __init__(self, cfg: Config, *, timeout_s: float | None = None) -> None:
        c = cfg.cluster
        self.cfg = cfg
        self.timeout_s = timeout_s or c.lookup_timeout_s
        self.wire = wire_dtype(c.wire_dtype)
        self.kind = c.optimizer
        self.refresh()
        self._alive = heartbeat_alive(c.redis_url, c.namespace)
        self._check_every_s = max(0.5, min(2.0, c.heartbeat_ttl_s / 2))
        opts = [("grpc.max_send_message_length", c.max_message_mb << 20),
                ("grpc.max_receive_message_length", c.max_message_mb << 20)]
        self.channels = {sid: grpc.insecure_channel(addr, options=opts) for sid, addr in self.addresses.items()}
        self.stubs = {sid: shard_pb2_grpc.MemoryShardStub(ch) for sid, ch in self.channels.items()}

    def refresh(self) -> None:
        """Read the slot map and the live shards' addresses from the control plane."""
        c = self.cfg.cluster

        async def read() -> tuple[Any, list]:
            cp = ControlPlane.connect(c.redis_url, c.namespace)
            try:
                return await cp.slot_map(), await cp.shards()
            finally:
                await cp.close()

        slot_map, shards = _run(read())
        alive = {s.shard_id: s.address for s in shards if s.alive}
        missing = sorted(set(slot_map.owners) - set(alive))
        if missing:
            raise RuntimeError(
                f"cluster {c.namespace!r} at {c.redis_url}: shards {missing} own slots but are not alive; "
                "start them (engram up) before training"
            )
        self.epoch = slot_map.epoch
        self.owners = np.asarray(slot_map.owners, dtype=np.int64)  # (num_slots,) slot -> shard
        self.addresses = {sid: alive[sid] for sid in sorted(set(slot_map.owners))}

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def _owner(self, ids: np.ndarray) -> np.ndarray:
        return self.owners[ids % len(self.owners)]  # (n,) shard id per row

    def _call(self, what: str, sid: int, fut: grpc.Future) -> Any:
        address = self.addresses[sid]
        try:
            return result_while_alive(fut, alive=lambda: self._alive(sid), check_every_s=self._check_every_s)
        except ShardSilent:
            ttl = self.cfg.cluster.heartbeat_ttl_s
            raise ShardRequestError(
                grpc.StatusCode.UNAVAILABLE, f"the shard stopped heartbeating (no beat for over {ttl:g} s, "
                "cluster.heartbeat_ttl_s) while the call waited: it is stopped, hung or cut off",
                address=address, shard_id=sid, call=what,
            ) from None
        except grpc.RpcError as err:
            raise ShardRequestError(err.code() or grpc.StatusCode.UNKNOWN, err.details() or "(no details)",
                                    address=address, shard_id=sid, call=what) from None

    # ---------------------------------------------------------------------------------------
    # rows

    def lookup(
        self, table: int, ids: np.ndarray, *, dtype: int | None = None, step: int = 0, max_staleness: int = 0
    ) -> tuple[torch.Tensor, int]:
        """(U,) int64 global rows -> rows fp32 (U, dh), min applied_step over the shards that answered.

        With `step` the shards refuse (UNAVAILABLE) rows that miss more than `max_staleness` steps.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        owner = self._owner(ids)
        dtype = self.wire if dtype is None else dtype
        futs = {}
        for sid, stub in self.stubs.items():
            pos = np.flatnonzero(owner == sid)
            req = shard_pb2.LookupRequest(table=table, epoch=self.epoch, row_ids=pack_ids(ids[pos]),
                                          dtype=dtype, step=step, max_staleness=max_staleness)  # type: ignore[arg-type]
            futs[sid] = (pos, stub.Lookup.future(req, timeout=self.timeout_s))
        out: torch.Tensor | None = None
        applied = None
        for sid, (pos, fut) in futs.items():
            resp = self._call(f"Lookup of table {table}", sid, fut)
            applied = resp.applied_step if applied is None else min(applied, resp.applied_step)
            if out is None:
                out = torch.empty((ids.size, resp.dim), dtype=torch.float32)  # (U, dh)
            if pos.size:
                out[torch.from_numpy(pos)] = unpack_rows(resp.rows, resp.dtype, resp.dim).float()
        assert out is not None and applied is not None
        return out, int(applied)

    def applied_steps(self) -> dict[int, int]:
        """{table: min applied_step over every shard} (empty lookups: cheap)."""
        return {t: self.lookup(t, np.empty(0, dtype=np.int64))[1] for t in self.cfg.engram.layer_ids}

    def push(
        self, table: int, ids: np.ndarray, grads: torch.Tensor, *, step: int, hyper: AdamParams,
        part_id: str, num_parts: int, max_staleness: int = 0,
    ) -> PushResult:
        """Summed gradients of unique rows (U,), (U, dh) fp32 for 1-based `step`, one request per shard."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        g = grads.detach().to(device="cpu", dtype=torch.float32).contiguous()  # (U, dh)
        owner = self._owner(ids)
        opt = shard_pb2.OptimizerParams(
            kind=self.kind, lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, eps=hyper.eps, version=1
        )
        futs = {}
        for sid, stub in self.stubs.items():
            pos = np.flatnonzero(owner == sid)
            req = shard_pb2.ApplyGradientsRequest(
                table=table, epoch=self.epoch, row_ids=pack_ids(ids[pos]),
                grads=pack_rows(g[torch.from_numpy(pos)], shard_pb2.FP32), step=step, optimizer=opt,
                part_id=part_id, num_parts=num_parts, max_staleness=max_staleness,
            )
            futs[sid] = stub.ApplyGradients.future(req, timeout=max(self.timeout_s, 120.0))
        resps = [self._call(f"ApplyGradients of table {table} step {step}", sid, f) for sid, f in futs.items()]
        return PushResult(applied_step=min(r.applied_step for r in resps), pending=any(r.pending for r in resps))

    def wait_applied(self, step: int, *, timeout_s: float = 120.0) -> dict[int, int]:
        """Block until every table on every shard has applied `step` -> {table: applied}."""
        deadline, delay = time.monotonic() + timeout_s, 5e-4
        while True:
            applied = self.applied_steps()
            if min(applied.values()) >= step:
                return applied
            if time.monotonic() > deadline:
                raise TimeoutError(f"shards did not apply step {step} in {timeout_s:g} s (applied: {applied})")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def pull_table(self, table: int, num_rows: int) -> torch.Tensor:
        """The whole table (num_rows, dh) fp32, read back from the shards in chunks."""
        parts = [
            self.lookup(table, np.arange(a, min(num_rows, a + _MAX_LOOKUP_ROWS)), dtype=shard_pb2.FP32)[0]
            for a in range(0, num_rows, _MAX_LOOKUP_ROWS)
        ]
        return torch.cat(parts)

    # ---------------------------------------------------------------------------------------
    # checkpoints

    def checkpoint(self, directory: str | Path, step: int, *, extra: dict | None = None) -> dict:
        """Every shard writes its slots at `step` into `directory`; the manifest goes to Redis too."""
        directory = str(Path(directory).resolve())
        Path(directory).mkdir(parents=True, exist_ok=True)
        futs = {sid: stub.Checkpoint.future(shard_pb2.CheckpointRequest(directory=directory, step=step),
                                            timeout=600.0) for sid, stub in self.stubs.items()}
        files = []
        for sid, fut in futs.items():
            resp = self._call(f"Checkpoint at step {step}", sid, fut)
            files += [
                {"table": f.table, "slot": f.slot, "path": f.path, "sha256": f.sha256,
                 "num_rows": f.num_rows, "num_bytes": f.num_bytes, "shard": sid}
                for f in resp.files
            ]
        manifest = {
            "step": step, "directory": directory, "files": files, "epoch": self.epoch,
            "num_slots": len(self.owners), "num_shards": len(self.stubs), "created": time.time(), **(extra or {}),
        }
        c = self.cfg.cluster

        async def put() -> None:
            cp = ControlPlane.connect(c.redis_url, c.namespace)
            try:
                await cp.put_manifest(manifest)
            finally:
                await cp.close()

        _run(put())
        return manifest

    def discard_pending(self, num_parts: int) -> int:
        """Complete every half-collected step with empty parts -> how many parts were sent.

        A trainer that died mid-step can leave a step waiting for the parts of dead workers;
        the shard refuses Restore while a step is pending. Right before a restore (which
        overwrites rows, optimizer state and applied_step) such a step is harmless to finish:
        each shard gets empty parts 0..num_parts-1 of its next step; parts it already holds
        are refused ("already received") and ignored.
        """
        sent = 0
        hyper = shard_pb2.OptimizerParams(kind=self.kind, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, version=1)
        for sid, stub in self.stubs.items():
            for table in self.cfg.engram.layer_ids:
                probe = shard_pb2.LookupRequest(table=table, epoch=self.epoch, row_ids=b"",
                                               dtype=self.wire)  # type: ignore[arg-type]
                step = self._call("Lookup", sid, stub.Lookup.future(probe, timeout=self.timeout_s)).applied_step + 1
                for part in range(num_parts):
                    req = shard_pb2.ApplyGradientsRequest(
                        table=table, epoch=self.epoch, row_ids=b"", grads=b"", step=step, optimizer=hyper,
                        part_id=str(part), num_parts=num_parts,
                    )
                    try:
                        self._call("ApplyGradients (discarding a pending step)", sid,
                                   stub.ApplyGradients.future(req, timeout=self.timeout_s))
                        sent += 1
                    except ShardRequestError as exc:
                        if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                            raise
        return sent

    def restore(self, manifest: dict) -> int:
        """Every shard loads the slot files it owns (any shard count works: files are per slot)."""
        files = [
            shard_pb2.SlotFile(table=f["table"], slot=f["slot"], path=f["path"], sha256=f["sha256"],
                               num_rows=f["num_rows"], num_bytes=f["num_bytes"])
            for f in manifest["files"]
        ]
        req = shard_pb2.RestoreRequest(directory=manifest["directory"], files=files)
        futs = {sid: stub.Restore.future(req, timeout=600.0) for sid, stub in self.stubs.items()}
        steps = {self._call(f"Restore of step {manifest['step']}", sid, f).step for sid, f in futs.items()}
        if steps != {int(manifest["step"])}:
            raise RuntimeError(f"restore of manifest step {manifest['step']}: shards report steps {sorted(steps)}")
        return int(manifest["step"])
