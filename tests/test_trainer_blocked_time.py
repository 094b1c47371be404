"""The trainer's blocked time counts the shared-memory reads that run on its own thread.

A lookup whose rows are mapped from shared memory is read inside `SyncShardClient.lookup`, on
the training thread. The step issues the next step's prefetch and the sync re-read while it
computes; those reads block the thread like any wait on the shards, so `StepOut.lookup_s` must
hold them (and the summary line's blocked fraction with it), not `compute_s`.

Real redis-server and shard processes (tiny preset, 1 shard, cluster.row_path=shm), a real
RemoteStep with world 1. Each read is slowed by a sleep so that it is far longer than
the rest of the step's bookkeeping: the test then tells "counted" from "not counted" for sure.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.model import EngramLM
from services.client.sync import SyncShardClient
from services.launcher import LocalCluster
from trainer.remote_step import RemoteStep
from trainer.step import build_optimizers

pytestmark = pytest.mark.timeout(180)
DELAY_S = 0.05  # added to every inline read


def test_inline_shm_reads_are_lookup_time_not_compute(tmp_path) -> None:
    cluster = LocalCluster(
        preset="tiny", num_shards=1, log_dir=tmp_path / "logs", shard_args=["--threads", "2"]
    ).start()
    try:
        cfg = load_config("tiny", None, [*cluster.cluster_overrides, "cluster.row_path=shm"])
        rows = SyncShardClient.connect(cfg)
        real_read_now = rows.client.read_now
        reads: list[tuple[float, bool]] = []  # (seconds inside read_now, rows read inline?)

        def slow_read_now(*args, **kwargs):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            time.sleep(DELAY_S)
            got = real_read_now(*args, **kwargs)
            reads.append((time.perf_counter() - t0, got is not None))
            return got

        rows.client.read_now = slow_read_now  # type: ignore[method-assign]
        torch.manual_seed(0)
        model = EngramLM(cfg, np.arange(cfg.model.vocab_size), local_tables=False)
        opt, _ = build_optimizers(model, cfg.train)
        step = RemoteStep(model=model, ddp=model, shards=rows, backbone_opt=opt, cfg=cfg, rank=0, world=1, device="cpu")
        rng = np.random.default_rng(0)
        x = [rng.integers(0, cfg.model.vocab_size, (4, 16)) for _ in range(5)]
        results = []
        for s in range(4):
            reads.clear()
            t0 = time.perf_counter()
            out = step.train_step(s, x[s], x[s + 1], next_x=x[s + 1])
            wall = time.perf_counter() - t0
            results.append((out, wall, sum(t for t, _ in reads), sum(hit for _, hit in reads)))
        step.close()
        rows.close()
    finally:
        cluster.stop()
    assert all(np.isfinite(float(out.loss)) for out, *_ in results)
    # the first lookups open the shared-memory files on the loop; from then on the prefetch reads inline
    assert sum(hits for *_, hits in results[1:]) >= 3, f"no inline shared-memory reads: {results}"
    for s, (out, wall, in_reads, hits) in enumerate(results):
        # every second spent reading rows on the training thread is blocked time ...
        assert out.lookup_s >= in_reads - 1e-6, f"step {s + 1}: {in_reads:.3f}s of reads, lookup_s {out.lookup_s:.3f}"
        # ... and not compute: the three parts still add up to at most the step's wall time
        assert out.compute_s >= 0 and out.lookup_s + out.compute_s + out.push_s <= wall + 1e-6
        if hits:
            assert out.lookup_s >= DELAY_S, f"step {s + 1}: inline reads but lookup_s {out.lookup_s:.3f}"
