"""One data-parallel training step with the Engram tables on the memory shards.

The stages of step s (1-based optimizer step id; `step0 = s - 1` indexes the LR schedule):

    1. indices   model.engram_indices(x_local)          {layer: (unique (U,), inverse (B, T, Hn))}  no I/O
    2. gate      wait until the shards have applied step s-1 (sync) or s-1-k (async), checked on
                 every lookup response's applied_step; measured staleness = (s-1) - applied
    3. lookup    rows (U, dh) fp32 -> grad-requiring leaves -> EngramRows
    4. compute   DDP forward/backward (dense grads averaged over workers), clip, AdamW step
    5. push      (unique rows, rows.grad / world) per layer with step s, part_id = rank,
                 num_parts = world; the shard sums the parts and runs lazy Adam once

Why / world: each worker's loss is the mean over its 1/world of the global batch, so the
global-batch gradient of a row is the *mean* of the workers' gradients; the shard sums the
parts, so each part is pre-divided. DDP does the same averaging for the dense parameters.

sync: push in the foreground, and the next lookups wait until step s is applied -> equal to
single-process training on the same global batch. async: pushes run in order on one
background thread, overlapping the next step; the gate enforces the staleness bound k.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
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
from trainer.shard_rows import ShardRequestError, ShardRows
from trainer.step import local_slice, lr_factor, set_lr


class StaleRowsError(RuntimeError):
    """The shards are ahead of (or too far behind) the step the trainer is computing."""


@dataclass
class StepOut:
    loss: float  # mean loss over the global batch (all-reduced)
    tokens: int  # tokens of the global batch
    staleness: int  # steps of updates the lookups of this step missed (max over tables/shards)
    lookup_s: float = 0.0
    compute_s: float = 0.0
    push_s: float = 0.0


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


class RemoteStep:
    def __init__(
        self, *, model: EngramLM, ddp: torch.nn.Module, rows: ShardRows, backbone_opt: torch.optim.Optimizer,
        cfg: Config, rank: int, world: int, device: str,
    ) -> None:
        self.model, self.ddp, self.rows, self.opt = model, ddp, rows, backbone_opt
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.mode, self.k = cfg.dist.mode, cfg.dist.staleness
        self.pusher = ThreadPoolExecutor(1, thread_name_prefix="push") if self.mode == "async" else None
        self.inflight: deque[Future] = deque()
        self.staleness = StalenessStats()

    # ---------------------------------------------------------------------------------------
    # stages 2-3: gated lookups

    def required_applied(self, step: int) -> int:
        """The oldest applied step the lookups of 1-based `step` may see."""
        behind = 0 if self.mode == "sync" else self.k
        return max(0, step - 1 - behind)

    def fetch(self, step: int, indices: dict[int, tuple[torch.Tensor, torch.Tensor]], *, need_grad: bool,
              timeout_s: float = 120.0) -> tuple[dict[int, EngramRows], int]:
        """Lookups for `step` that see at least `required_applied(step)` -> (rows, staleness)."""
        need = self.required_applied(step)
        deadline, delay = time.monotonic() + timeout_s, 5e-4
        while True:
            self._raise_push_errors()
            out, oldest = {}, None
            try:
                for layer, (unique, inverse) in indices.items():
                    # the shards enforce the bound too: they refuse rows older than `need` (UNAVAILABLE)
                    rows, applied = self.rows.lookup(layer, unique.cpu().numpy(), step=step,
                                                     max_staleness=step - 1 - need)  # (U, dh) fp32
                    oldest = applied if oldest is None else min(oldest, applied)
                    rows = rows.to(self.device).requires_grad_(need_grad)
                    out[layer] = EngramRows(rows=rows, inverse=inverse.to(self.device))
            except ShardRequestError as err:
                if err.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                oldest = -1  # not applied far enough yet: wait like below
            assert oldest is not None
            if oldest >= 0 and oldest > step - 1:
                raise StaleRowsError(
                    f"the shards have applied step {oldest} but the trainer is computing step {step}: "
                    "the tables are ahead of the dense state; restore a checkpoint (--resume) or start a fresh cluster"
                )
            if oldest >= need:
                return out, step - 1 - oldest
            if time.monotonic() > deadline:
                raise StaleRowsError(
                    f"step {step}: the shards stayed at applied step {oldest} for {timeout_s:g} s, but "
                    f"{self.mode} mode needs >= {need} (staleness bound {self.k if self.mode == 'async' else 0})"
                )
            time.sleep(delay)
            delay = min(2 * delay, 0.02)

    # ---------------------------------------------------------------------------------------
    # stage 5: pushes

    def engram_hyper(self, step0: int) -> AdamParams:
        t = self.cfg.train
        return AdamParams(lr=t.lr * t.engram_lr_mult * lr_factor(step0, t))

    def _push(self, step: int, hyper: AdamParams, grads: dict[int, tuple[np.ndarray, torch.Tensor]]) -> None:
        for layer, (ids, g) in grads.items():
            self.rows.push(
                layer, ids, g, step=step, hyper=hyper, part_id=str(self.rank), num_parts=self.world,
                max_staleness=self.k if self.mode == "async" else 0,
            )

    def _raise_push_errors(self) -> None:
        while self.inflight and self.inflight[0].done():
            self.inflight.popleft().result()  # re-raises a failed push here, on the training thread

    def drain(self) -> None:
        """Wait for every push of this worker to be answered (errors are raised)."""
        while self.inflight:
            self.inflight.popleft().result()

    # ---------------------------------------------------------------------------------------
    # the step

    def train_step(self, step0: int, x_BT: np.ndarray, y_BT: np.ndarray) -> StepOut:
        """One optimizer step on this worker's slice of the global batch (x, y: (B, T) global)."""
        with telemetry.span("train.step", step=step0 + 1, rank=self.rank, mode=self.mode):
            out = self._train_step(step0, x_BT, y_BT)
        telemetry.record_staleness(out.staleness)
        return out

    def _train_step(self, step0: int, x_BT: np.ndarray, y_BT: np.ndarray) -> StepOut:
        step, t = step0 + 1, self.cfg.train
        x_cpu = torch.from_numpy(local_slice(x_BT, self.rank, self.world))  # (B/world, T)
        x = x_cpu.to(self.device)
        y = torch.from_numpy(local_slice(y_BT, self.rank, self.world)).to(self.device)
        t0 = time.perf_counter()
        indices = self.model.engram_indices(x_cpu)  # CPU: no device sync (engram.indexer)
        with telemetry.span("train.lookup", step=step):
            engram_rows, stale = self.fetch(step, indices, need_grad=True)
        self.staleness.add(stale)
        t1 = time.perf_counter()
        set_lr(step0, t, self.opt)
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.ddp(x, y, engram_rows=engram_rows)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.dense_parameters(), t.grad_clip)
        self.opt.step()
        grads = {}
        for layer, r in engram_rows.items():
            assert r.rows.grad is not None, f"layer {layer}: the rows got no gradient"
            grads[layer] = (indices[layer][0].cpu().numpy(), r.rows.grad.detach().cpu() / self.world)  # (U,), (U, dh)
        t2 = time.perf_counter()
        hyper = self.engram_hyper(step0)
        if self.pusher is None:
            with telemetry.span("train.push", step=step, layers=len(grads)):
                self._push(step, hyper, grads)
        else:
            self.inflight.append(self.pusher.submit(self._push, step, hyper, grads))
        t3 = time.perf_counter()
        # float(loss) is no extra sync: the row gradients were just copied to the host for the push
        global_loss = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(global_loss)
            global_loss /= self.world
        return StepOut(loss=float(global_loss), tokens=x_BT.size, staleness=stale,
                       lookup_s=t1 - t0, compute_s=t2 - t1, push_s=t3 - t2)

    def settle(self, step: int) -> None:
        """Every push up to `step` answered and applied on every shard (before eval/checkpoint)."""
        self.drain()
        self.rows.wait_applied(step)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[np.ndarray, np.ndarray]], step: int) -> float:
        """Mean validation loss over `batches` (split round-robin over workers) after `step` is applied."""
        self.settle(step)
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of batch losses, batches)
        for i in range(self.rank, len(batches), self.world):
            x = torch.from_numpy(batches[i][0]).to(self.device)
            y = torch.from_numpy(batches[i][1]).to(self.device)
            rows = {layer: EngramRows(rows=self.rows.lookup(layer, u.cpu().numpy())[0].to(self.device),
                                      inverse=inv.to(self.device))
                    for layer, (u, inv) in self.model.engram_indices(torch.from_numpy(batches[i][0])).items()}
            _, loss = self.model(x, y, engram_rows=rows)
            total += torch.tensor([float(loss), 1.0], dtype=torch.float64, device=self.device)
        self.model.train()
        if self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.shutdown(wait=True, cancel_futures=False)
