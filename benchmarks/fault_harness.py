"""Shared by benchmarks/failover.py, benchmarks/soak.py and tests/test_failover*.py: faults on a real cluster.

- `LookupLoad`: a thread issuing lookups of one table without pause, counting failures and wrong rows;
- `KillRestart`: kill -9 of one shard and its restart, on a step schedule, every N seconds, or once
  the shards applied a step (training that runs elsewhere, e.g. Ray workers);
- `Pusher`: sync pushes of deterministic gradients, step after step, and the single-process
  reference of the rows they make;
- `train_remote`: a one-worker sync training loop (trainer.remote_step.RemoteStep) against the shards,
  with a hook before every step (where the faults go);
- slot-map and event helpers, `holder_rows` (one replica's copy of a table).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from engram.init import init_rows
from engram.layout import table_layouts
from engram.row_optim import AdamParams, lazy_adam_
from services.client import ShardClient
from services.client.sync import SyncShardClient
from services.launcher import LocalCluster


def wait_for(what: str, pred: Callable[[], Any], *, timeout_s: float = 30.0, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")


async def _with_control(cluster: LocalCluster, fn: Callable[[Any], Any]) -> Any:
    cp = cluster.control()
    try:
        return await fn(cp)
    finally:
        await cp.close()


def slot_map(cluster: LocalCluster) -> Any:
    return asyncio.run(_with_control(cluster, lambda cp: cp.slot_map()))


def events(cluster: LocalCluster) -> list[dict]:
    """Failover/repair events, oldest first."""
    return list(reversed(asyncio.run(_with_control(cluster, lambda cp: cp.events()))))


def fully_replicated(cluster: LocalCluster, shard_ids: set[int], replicas: int = 2) -> Any:
    """The slot map once every slot has `replicas` holders among exactly `shard_ids`, else None."""
    smap = slot_map(cluster)
    ok = all(len(smap.holders(s)) == replicas for s in range(len(smap.owners))) and smap.all_holders() == shard_ids
    return smap if ok else None


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99)) if xs else float("nan")


class LookupLoad:
    """Steady lookups of `ids` of one table from a thread; failures, wrong rows and latencies are kept."""

    def __init__(self, cfg: Any, table: int, ids: np.ndarray, *, want: torch.Tensor | None = None) -> None:
        self.cfg, self.table, self.ids, self.want = cfg, table, ids, want
        self.ok = self.failed = self.wrong = 0
        self.errors: list[str] = []
        self.samples: list[tuple[float, float]] = []  # (time.monotonic() at the start, latency s)
        self.client: Any = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with SyncShardClient.connect(self.cfg) as rows:
            self.client = rows.client
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    got, _ = rows.lookup(self.table, self.ids).result()
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    self.failed += 1
                    self.errors.append(repr(exc)[:300])
                    continue
                self.samples.append((t0, time.monotonic() - t0))
                if self.want is None or torch.equal(got, self.want):
                    self.ok += 1
                else:
                    self.wrong += 1

    def latencies(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        return [lat for t, lat in self.samples if start <= t <= end]

    def wait_more(self, n: int = 3, timeout_s: float = 30.0) -> None:
        have = self.ok
        wait_for(f"{n} more lookups", lambda: self.ok >= have + n or self.failed > 0, timeout_s=timeout_s)

    def __enter__(self) -> LookupLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(60)


def train_remote(
    cfg: Any, data: Any, *, steps: int, on_step: Callable[[int], bool | None] | None = None
) -> tuple[list[float], dict[str, torch.Tensor], SyncShardClient]:
    """One-worker sync training with the tables on the cluster -> (losses, dense state, open row client).

    `on_step(step0)` runs before each step; True stops the run there (len(losses) steps ran)."""
    from trainer.ray_trainer import shard_model
    from trainer.remote_step import RemoteStep
    from trainer.step import build_optimizers

    _, vocab, dataset = data
    t = cfg.train
    model = shard_model(cfg, vocab.lookup)
    backbone_opt, _ = build_optimizers(model, t)
    rows = SyncShardClient.connect(cfg)
    runner = RemoteStep(
        model=model,
        ddp=model,
        shards=rows,
        backbone_opt=backbone_opt,
        cfg=cfg,
        rank=0,
        world=1,
        device="cpu",
        timeout_s=60.0,
    )
    rng = np.random.default_rng(t.seed)
    losses = []
    nxt = dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng)
    for step0 in range(steps):
        x, y = nxt
        nxt = dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng)
        if on_step is not None and on_step(step0):
            break
        losses.append(float(runner.train_step(step0, x, y, next_x=nxt[0] if step0 + 1 < steps else None).loss))
    runner.settle(len(losses))
    runner.close()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, rows


def holder_rows(cfg: Any, smap: Any, addresses: dict[int, str], *, shard_id: int, table: int, n: int) -> torch.Tensor:
    """(n, D) fp32 rows of `table` read from one holder only (every slot routed to `shard_id`)."""

    async def go() -> torch.Tensor:
        client = ShardClient(
            cfg,
            epoch=smap.epoch,
            owners=[shard_id] * cfg.cluster.num_slots,
            addresses=addresses,
            wire_dtype="fp32",
            row_path="grpc",
        )
        try:
            return await client.lookup(table, np.arange(n), dedup_ids=False)
        finally:
            await client.close()

    return asyncio.run(go())


class KillRestart:
    """kill -9 of one shard of a LocalCluster, and its restart (it rejoins empty and is rebuilt from
    the live replicas, docs/failover.md). The schedules are hooks for `train_remote` or a thread."""

    def __init__(self, cluster: LocalCluster, shard_id: int) -> None:
        self.cluster, self.shard_id = cluster, shard_id
        self.kills = self.restarts = 0
        self.errors: list[BaseException] = []
        self._timers: list[threading.Timer] = []

    def kill(self, *, after_s: float = 0.0) -> None:
        """SIGKILL the shard now and reap it, or from a timer in `after_s` (to land inside a step)."""
        proc = self.cluster.shards[self.shard_id]
        self.kills += 1
        if after_s > 0:
            self._timers.append(threading.Timer(after_s, os.kill, (proc.pid, signal.SIGKILL)))
            self._timers[-1].start()
            return
        os.kill(proc.pid, signal.SIGKILL)
        proc.proc.wait(10)

    def restart(self) -> None:
        self.cluster.add_shard(self.shard_id)
        self.restarts += 1

    def at_steps(self, *, kill: int, restart: int, kill_after_s: float = 0.01) -> Callable[[int], None]:
        """A `train_remote` hook: kill -9 inside step `kill` + 1, restart before step `restart` + 1."""

        def hook(step0: int) -> None:
            if step0 == kill:
                self.kill(after_s=kill_after_s)
            if step0 == restart:
                self.restart()

        return hook

    def every(
        self, period_s: float, *, until: float, on_fault: Callable[[float], None] | None = None
    ) -> Callable[[int], bool]:
        """A `train_remote` hook: kill -9 + restart every `period_s` until time.monotonic() >= `until`,
        when it answers True (stop training). `on_fault(now)` runs after each restart."""
        state = {"next": time.monotonic() + period_s}

        def hook(step0: int) -> bool:
            now = time.monotonic()
            if state["next"] <= now < until:
                self.kill()
                self.restart()
                state["next"] = now + period_s
                if on_fault is not None:
                    on_fault(now)
            return now >= until

        return hook

    def when_applied(self, cfg: Any, *, kill: int, restart: int, timeout_s: float = 240.0) -> threading.Thread:
        """A started thread: kill -9 once every table applied step `kill`, restart once it applied
        `restart` (or `timeout_s` passed); what went wrong is kept in `errors`."""

        def applied(rows: SyncShardClient) -> int:
            try:
                return min(rows.applied_steps().values(), default=0)
            except Exception:  # noqa: BLE001 - a shard just died or is fenced: ask again
                return -1

        def run() -> None:
            try:
                with SyncShardClient.connect(cfg) as rows:
                    wait_for(f"step {kill} applied", lambda: applied(rows) >= kill, timeout_s=timeout_s, every_s=0.01)
                    self.kill()
                    wait_for(
                        f"step {restart} applied", lambda: applied(rows) >= restart, timeout_s=timeout_s, every_s=0.05
                    )
                    self.restart()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


ADAM: dict[str, Any] = {"kind": "adam", "lr": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


class Pusher:
    """Sync pushes of steps 1, 2, ... to one table (`rows_per_step` random rows, seeded by the step),
    in the caller's thread (`push`) or a background one (`start`/`stop`); `reference()` replays
    them on a single-process table with the same lazy Adam."""

    def __init__(self, cfg: Any, table: int, *, rows_per_step: int = 300, pause_s: float = 0.02) -> None:
        self.cfg, self.table, self.k, self.pause_s = cfg, table, rows_per_step, pause_s
        self.layout = table_layouts(cfg.engram)[table]
        self.step = 0
        self.rows = SyncShardClient.connect(cfg, wire_dtype="fp32", timeout_s=120.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []

    def grads(self, step: int) -> tuple[np.ndarray, torch.Tensor]:
        """-> (k,) distinct rows, (k, D) fp32 gradients of `step`."""
        rng = np.random.default_rng(1000 + step)
        ids = np.sort(rng.choice(self.layout.num_rows, size=self.k, replace=False))
        return ids, torch.from_numpy(rng.standard_normal((self.k, self.layout.dim)).astype(np.float32))

    def push(self, n: int = 1) -> None:
        for _ in range(n):
            ids, g = self.grads(self.step + 1)
            self.rows.push(self.table, ids, g, step=self.step + 1, optimizer=ADAM).result(180)
            self.step += 1

    def start(self) -> Pusher:
        def run() -> None:
            try:
                while not self._stop.wait(self.pause_s):
                    self.push()
            except BaseException as exc:  # noqa: BLE001 - re-raised by stop()
                self.errors.append(exc)

        self._stop.clear()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(200)
        if self.errors:
            raise self.errors[0]

    def reference(self) -> torch.Tensor:
        """(R, D) fp32: the table after `self.step` steps, in one process."""
        n, dim = self.layout.num_rows, self.layout.dim
        c = self.cfg.engram
        w = torch.from_numpy(init_rows(seed=c.seed, layer_id=self.table, rows=np.arange(n), dim=dim, std=c.init_std))
        m, v = torch.zeros_like(w), torch.zeros_like(w)
        p = AdamParams(lr=ADAM["lr"], beta1=ADAM["beta1"], beta2=ADAM["beta2"], eps=ADAM["eps"])
        for step in range(1, self.step + 1):
            ids, g = self.grads(step)
            idx = torch.from_numpy(ids)
            ws, ms, vs = w.index_select(0, idx), m.index_select(0, idx), v.index_select(0, idx)  # (k, D) each
            lazy_adam_(ws, ms, vs, g=g, step=step, p=p)
            w.index_copy_(0, idx, ws)
            m.index_copy_(0, idx, ms)
            v.index_copy_(0, idx, vs)
        return w

    def close(self) -> None:
        self._stop.set()
        self.rows.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def holder_slot_rows(
    cfg: Any, smap: Any, addresses: dict[int, str], *, shard_id: int, table: int, ids: np.ndarray
) -> torch.Tensor:
    """(n, D) fp32 rows `ids` (of slots `shard_id` holds) read from that holder only."""

    async def go() -> torch.Tensor:
        client = ShardClient(
            cfg,
            epoch=smap.epoch,
            owners=smap.view_for(shard_id),
            addresses=addresses,
            wire_dtype="fp32",
            row_path="grpc",
        )
        try:
            return await client.lookup(table, ids, dedup_ids=False)
        finally:
            await client.close()

    return asyncio.run(go())
