"""One data-parallel training step with the Engram tables on the memory shards, prefetching.

The stages of step s (1-based optimizer step id; `step0 = s - 1` indexes the LR schedule):

    1. rows      wait for the rows of step s, issued during step s-1 (prefetch P_s); in sync mode
                 also the re-read R_s (below). Gate: every row has seen step s-1 (sync) or s-1-k
                 (async), checked on every response's applied_step, and by the shards themselves
    2. prefetch  indices of the next batch's slice {layer: (unique (U,), inverse (B, T, Hn))}, no I/O,
                 and its lookups P_{s+1} leave now: they fly while step s computes
    3. compute   DDP forward/backward (dense grads averaged over workers)
    4. push      (unique rows, rows.grad / world) per layer with step s, part_id = rank, num_parts =
                 world, all layers at once; the shard sums the parts and runs lazy Adam once.
                 The dense clip + AdamW step runs while the push is on the wire
    5. barrier   sync: wait for the push's answers, then the loss all-reduce: once every worker got
                 its answers, every shard has applied step s (the last part's answer comes after
                 the update). Then R_{s+1} leaves: the rows of P_{s+1} that step s updated

Why sync stays exact: P_{s+1} is gated at applied >= s-1 (max_staleness 1). Step s updates only
the rows of its global batch G_s (lazy Adam writes the touched rows, nothing else), so every row
of P_{s+1} outside G_s already has its step-s value. The rows in G_s are read again (R_{s+1})
after step s is applied everywhere; every worker knows G_s because every worker samples the
whole global batch (it keeps only its slice for compute). A prefetch whose answers already show
applied_step >= s needs no re-read.

Why / world: each worker's loss is the mean over its 1/world of the global batch, so the
global-batch gradient of a row is the *mean* of the workers' gradients; the shard sums the
parts, so each part is pre-divided. DDP does the same averaging for the dense parameters.

async: pushes are chained on the client's loop (step s+1 is sent after step s was answered)
and not waited for; P_{s+1} is gated at applied >= s-k by the shards and needs no re-read.

Timing (StepOut): lookup_s and push_s are the time the training thread waits on the shards
(blocked_s); everything else of the step is compute_s. Issuing a lookup is lookup time too,
wherever in the step it happens: a lookup whose rows are mapped from shared memory is read on
the training thread inside `SyncShardClient.lookup` (no hop to the loop thread), so issuing the
prefetch P_{s+1} and the re-read R_{s+1} during step s blocks the thread for the whole read.
That time moves from compute_s to lookup_s (`_lookup` counts it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
import torch.distributed as dist

from engram.config import Config
from engram.engram_layer import EngramRows
from engram.model import EngramLM
from engram.row_optim import AdamParams
from services import telemetry
from services.client import ShardError
from services.client.sync import SyncShardClient
from trainer.step import StepOut, local_slice, lr_factor, set_lr

Indices = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (unique (U,), inverse (B, T, Hn))


class StaleRowsError(RuntimeError):
    """The shards are ahead of (or too far behind) the step the trainer is computing."""


@dataclass
class StalenessStats:
    max: int = 0
    total: int = 0
    steps: int = 0
    histogram: dict[int, int] = field(default_factory=dict)

    def add(self, s: int) -> None:
        self.max, self.total, self.steps = max(self.max, s), self.total + s, self.steps + 1
        self.histogram[s] = self.histogram.get(s, 0) + 1

    def as_dict(self) -> dict:
        mean = self.total / self.steps if self.steps else 0.0
        return {"max": self.max, "mean": mean, "steps": self.steps, "histogram": dict(sorted(self.histogram.items()))}


@dataclass
class Prefetch:
    """The lookups of one step, in flight."""

    step: int
    max_staleness: int  # the gate the shards apply: applied >= step - 1 - max_staleness
    x_BT: np.ndarray  # (B, T) the global batch they are for
    indices: Indices
    futures: dict[int, cf.Future]  # layer -> future of ((U, dh) fp32, applied_step)
    reread: dict[int, tuple[np.ndarray, cf.Future]] = field(default_factory=dict)  # layer -> (positions, future)


class RemoteStep:
    """The remote row backend of trainer.loop: this worker's slice, rows from the shards, DDP for the dense part."""

    rows_remote = True

    def __init__(
        self,
        *,
        model: EngramLM,
        ddp: torch.nn.Module,
        shards: SyncShardClient,
        backbone_opt: torch.optim.Optimizer,
        cfg: Config,
        rank: int,
        world: int,
        device: str,
        timeout_s: float | None = None,
    ) -> None:
        self.model, self.ddp, self.shards, self.opt = model, ddp, shards, backbone_opt
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.mode, self.k = cfg.dist.mode, cfg.dist.staleness
        self.timeout_s = cfg.dist.step_timeout_s if timeout_s is None else timeout_s
        self.staleness = StalenessStats()
        self.issue_s = 0.0  # seconds the training thread spent inside the row client's lookup calls
        self._next: Prefetch | None = None
        self._pushes: list[cf.Future] = []  # async: answered in order, errors raised on the training thread

    # ---------------------------------------------------------------------------------------
    # stages 1-2: lookups

    def required_applied(self, step: int) -> int:
        """The oldest applied step the lookups of 1-based `step` may see."""
        behind = 0 if self.mode == "sync" else self.k
        return max(0, step - 1 - behind)

    def _lookup(self, layer: int, ids: np.ndarray, *, step: int, max_staleness: int) -> cf.Future:
        """`shards.lookup`, timed: a shared-memory lookup is read right here, on this thread (blocked time)."""
        t0 = time.perf_counter()
        try:
            return self.shards.lookup(layer, ids, step=step, max_staleness=max_staleness, timeout_s=self.timeout_s)
        finally:
            self.issue_s += time.perf_counter() - t0

    def _issue(self, step: int, x_BT: np.ndarray, *, max_staleness: int) -> Prefetch:
        x_cpu = torch.from_numpy(local_slice(x_BT, self.rank, self.world))  # (B/world, T)
        indices = self.model.engram_indices(x_cpu)  # CPU: no device sync (engram.indexer)
        futures = {
            layer: self._lookup(layer, u.cpu().numpy(), step=step, max_staleness=max_staleness)
            for layer, (u, _) in indices.items()
        }
        return Prefetch(step=step, max_staleness=max_staleness, x_BT=x_BT, indices=indices, futures=futures)

    def _wait(self, fut: cf.Future, *, step: int, ids: np.ndarray, layer: int, max_staleness: int):  # type: ignore[no-untyped-def]
        """A lookup's answer; a gate still closed at the client's deadline (UNAVAILABLE) is asked again."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            self._raise_push_errors()
            try:
                return fut.result()
            except ShardError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise StaleRowsError(
                        f"step {step}: the rows of table {layer} did not arrive ({err}); {self.mode} mode needs the "
                        f"shards at applied step >= {step - 1 - max_staleness}"
                    ) from err
            fut = self._lookup(layer, ids, step=step, max_staleness=max_staleness)

    def fetch(self, step: int, pre: Prefetch, *, need_grad: bool) -> tuple[dict[int, EngramRows], int, int]:
        """The rows of `step` from its prefetch (+ re-read) -> (rows, staleness, rows read again)."""
        need = self.required_applied(step)
        out, oldest, reread = {}, None, 0
        for layer, (unique, inverse) in pre.indices.items():
            ids = unique.cpu().numpy()
            rows, applied = self._wait(
                pre.futures[layer], step=step, ids=ids, layer=layer, max_staleness=pre.max_staleness
            )
            if layer in pre.reread:
                pos, fut = pre.reread[layer]
                fresh, applied2 = self._wait(fut, step=step, ids=ids[pos], layer=layer, max_staleness=0)
                rows[torch.from_numpy(pos)] = fresh  # (r, dh) rows step-1 updated
                applied = step - 1 if applied2 is None else applied2  # the other rows: current as of step - 1
                reread += pos.size
            if applied is not None:
                oldest = applied if oldest is None else min(oldest, applied)
            out[layer] = EngramRows(
                rows=rows.to(self.device).requires_grad_(need_grad), inverse=inverse.to(self.device)
            )
        oldest = step - 1 if oldest is None else oldest
        if oldest > step - 1:
            raise StaleRowsError(
                f"the shards have applied step {oldest} but the trainer is computing step {step}: "
                "the tables are ahead of the dense state; restore a checkpoint (--resume) or start a fresh cluster"
            )
        if oldest < need:
            raise StaleRowsError(f"step {step}: rows at applied step {oldest}, {self.mode} mode needs >= {need}")
        return out, step - 1 - oldest, reread

    def _prefetch_next(self, step: int, next_x: np.ndarray | None) -> None:
        """P_{step+1}: sync gates it at applied >= step-1 (step's own update is read again later)."""
        if next_x is None:
            return
        slack = 1 if self.mode == "sync" else self.k
        self._next = self._issue(step + 1, next_x, max_staleness=slack)

    def _reread(self, step: int, x_BT: np.ndarray) -> None:
        """Sync, after step `step` is applied everywhere: R_{step+1} = P_{step+1}'s rows that `step` updated."""
        pre = self._next
        if pre is None or self.mode != "sync":
            return
        updated = self.model.engram_indices(torch.from_numpy(x_BT).to(self.device))  # the global batch: G_step
        for layer, (unique, _) in pre.indices.items():
            fut = pre.futures[layer]
            if fut.done() and fut.exception() is None and (fut.result()[1] or 0) >= step:
                continue  # answered after step `step` was applied: nothing to read again
            ids = unique.cpu().numpy()
            pos = np.flatnonzero(np.isin(ids, updated[layer][0].cpu().numpy()))
            pre.reread[layer] = (pos, self._lookup(layer, ids[pos], step=step + 1, max_staleness=0))

    # ---------------------------------------------------------------------------------------
    # stage 4: pushes

    def engram_hyper(self, step0: int) -> AdamParams:
        t = self.cfg.train
        return AdamParams(lr=t.lr * t.engram_lr_mult * lr_factor(step0, t))

    def _push(self, step: int, hyper: AdamParams, grads: dict[int, tuple[np.ndarray, torch.Tensor]]) -> cf.Future:
        opt = {
            "kind": self.cfg.cluster.optimizer,
            "lr": hyper.lr,
            "beta1": hyper.beta1,
            "beta2": hyper.beta2,
            "eps": hyper.eps,
            "version": 1,
        }
        prev = self._pushes[-1] if self._pushes else None
        client = self.shards.client

        async def send() -> None:
            if prev is not None:  # async: steps reach the shards in order
                await asyncio.wrap_future(prev)
            await asyncio.gather(
                *(
                    client.apply_gradients(
                        layer,
                        ids,
                        g,
                        step=step,
                        optimizer=opt,
                        part_id=str(self.rank),
                        num_parts=self.world,
                        max_staleness=self.k if self.mode == "async" else 0,
                        timeout_s=self.timeout_s,
                    )
                    for layer, (ids, g) in grads.items()
                )
            )

        fut = self.shards.submit(send())
        self._pushes.append(fut)
        return fut

    def _raise_push_errors(self) -> None:
        while self._pushes and self._pushes[0].done():
            self._pushes.pop(0).result()  # re-raises a failed push here, on the training thread

    def drain(self) -> None:
        """Wait for every push of this worker to be answered (errors are raised)."""
        while self._pushes:
            self._pushes.pop(0).result()

    # ---------------------------------------------------------------------------------------
    # the step

    def train_step(
        self, step0: int, x_BT: np.ndarray, y_BT: np.ndarray, *, next_x: np.ndarray | None = None
    ) -> StepOut:
        """One optimizer step on this worker's slice of the global batch (x, y: (B, T) global).

        `next_x`: the next step's global batch, whose lookups then fly during this step.
        """
        with telemetry.span("train.step", step=step0 + 1, rank=self.rank, mode=self.mode):
            out = self._train_step(step0, x_BT, y_BT, next_x=next_x)
        telemetry.record_staleness(out.staleness)
        return out

    def _train_step(self, step0: int, x_BT: np.ndarray, y_BT: np.ndarray, *, next_x: np.ndarray | None) -> StepOut:
        step, t = step0 + 1, self.cfg.train
        t0 = time.perf_counter()
        pre = self._next
        if pre is None or pre.step != step or not np.array_equal(pre.x_BT, x_BT):
            pre = self._issue(step, x_BT, max_staleness=step - 1 - self.required_applied(step))
        self._next = None
        with telemetry.span("train.lookup", step=step):
            engram_rows, stale, reread = self.fetch(step, pre, need_grad=True)
        self.staleness.add(stale)
        t1 = time.perf_counter()
        issued1 = self.issue_s  # lookups issued from here on (prefetch, re-read) ran inside the compute stages
        self._prefetch_next(step, next_x)
        y = torch.from_numpy(local_slice(y_BT, self.rank, self.world)).to(self.device)
        x = torch.from_numpy(local_slice(x_BT, self.rank, self.world)).to(self.device)  # (B/world, T)
        lr = set_lr(step0, t, self.opt)
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.ddp(x, y, engram_rows=engram_rows)
        loss.backward()
        grads = {}
        for layer, r in engram_rows.items():
            assert r.rows.grad is not None, f"layer {layer}: the rows got no gradient"
            grads[layer] = (
                pre.indices[layer][0].cpu().numpy(),
                r.rows.grad.detach().cpu() / self.world,
            )  # (U,), (U, dh)
        pushed = self._push(step, self.engram_hyper(step0), grads)
        if t.grad_clip > 0:  # the dense update runs while the push is on the wire
            torch.nn.utils.clip_grad_norm_(self.model.dense_parameters(), t.grad_clip)
        self.opt.step()
        t2 = time.perf_counter()
        if self.mode == "sync":
            with telemetry.span("train.push", step=step, layers=len(grads)):
                pushed.result()
                self._pushes.remove(pushed)
        else:
            self._raise_push_errors()
        t3 = time.perf_counter()
        # float(loss) is no extra sync: the row gradients were just copied to the host for the push
        global_loss = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(global_loss)  # sync: also the barrier after which step s is applied everywhere
            global_loss /= self.world
        self._reread(step, x_BT)
        t4 = time.perf_counter()
        inline = self.issue_s - issued1  # shared-memory reads (and lookup issues) on this thread after t1
        return StepOut(
            loss=float(global_loss),
            tokens=x_BT.size,
            staleness=stale,
            lr=lr,
            lookup_s=(t1 - t0) + inline,
            compute_s=(t2 - t1) + (t4 - t3) - inline,
            push_s=t3 - t2,
            reread_rows=reread,
        )

    def settle(self, step: int) -> None:
        """Every push up to `step` answered and applied on every shard (before eval/checkpoint)."""
        self.drain()
        self.shards.wait_applied(step, timeout_s=self.timeout_s)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[tuple[np.ndarray, np.ndarray]], step: int) -> float:
        """Mean validation loss over `batches` (split round-robin over workers) after `step` is applied."""
        self.settle(step)
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of batch losses, batches)
        for i in range(self.rank, len(batches), self.world):
            x = torch.from_numpy(batches[i][0]).to(self.device)
            y = torch.from_numpy(batches[i][1]).to(self.device)
            indices = self.model.engram_indices(torch.from_numpy(batches[i][0]))  # CPU ids: no device sync
            futs = {
                layer: self.shards.lookup(layer, u.cpu().numpy(), timeout_s=self.timeout_s)
                for layer, (u, _) in indices.items()
            }
            rows = {
                layer: EngramRows(rows=futs[layer].result()[0].to(self.device), inverse=inv.to(self.device))
                for layer, (_, inv) in indices.items()
            }
            _, loss = self.model(x, y, engram_rows=rows)
            total += torch.tensor([float(loss), 1.0], dtype=torch.float64, device=self.device)
        self.model.train()
        if self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._next = None
