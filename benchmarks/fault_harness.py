"""Shared by benchmarks/failover.py, benchmarks/soak.py and tests/test_failover.py: faults on a real cluster.

- `LookupLoad`: a thread issuing lookups of one table without pause, counting failures and wrong rows;
- `train_remote`: a one-worker sync training loop (trainer.remote_step.RemoteStep) against the shards,
  with a hook before every step (where the faults go);
- slot-map and event helpers, `holder_rows` (one replica's copy of a table).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from services.client import ShardClient
from services.client.sync import SyncShardClient
from services.launcher import LocalCluster


def wait_for(what: str, pred: Callable[[], Any], timeout_s: float = 30.0, every_s: float = 0.05) -> Any:
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

    def __init__(self, cfg: Any, table: int, ids: np.ndarray, want: torch.Tensor | None = None) -> None:
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
        wait_for(f"{n} more lookups", lambda: self.ok >= have + n or self.failed > 0, timeout_s)

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


def holder_rows(cfg: Any, smap: Any, addresses: dict[int, str], shard_id: int, table: int, n: int) -> torch.Tensor:
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
