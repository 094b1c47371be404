"""Ray training (2 workers, sync) while the shards change under it, on real shard processes.

- slots move from TWO source shards to a third during training (per-slot applied steps on the
  target, services/shard/ownership.py): the run equals single-process training;
- 3 shards with cluster.replicas=2, a shard killed (-9) mid-run and restarted (rebuilt from the
  two survivors while training goes on): final losses, tables and dense weights equal an unfaulted
  run of the same cluster shape to 1e-6.

One Ray instance (2 CPUs) for the module; one Ray run at a time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.fault_harness import KillRestart, events, fully_replicated, wait_for
from engram.checkpoint import load_model
from engram.config import load_config
from services.client.sync import SyncShardClient
from services.launcher import LocalCluster
from tests.test_remote_training import (  # noqa: F401
    overrides,
    pull_tables,
    ray_session,
    reference,
    start_cluster,
    train_while_rebalancing,
    workdir,
)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)
FAST = [
    "cluster.heartbeat_s=0.2",
    "cluster.heartbeat_ttl_s=1.5",
    "cluster.failover_check_s=0.1",
    "cluster.replica_switch_s=0.5",
]


def test_slots_move_from_two_sources_during_sync_training(ray_session, workdir, reference) -> None:  # noqa: F811
    """2 -> 3 shards while two Ray workers train: shard 2 receives slots from shards 0 and 1, which
    may stand at different steps when copied (each source is frozen in turn)."""
    _, data, local, local_model = reference
    cluster, ov = start_cluster(workdir, "move2", num_shards=2)
    try:
        assert cluster.add_shard() == 2
        cfg = load_config("tiny", None, ov)
        result, report, applied_after = train_while_rebalancing(cluster, cfg, data, num_shards=3)
        assert set(report.moves) == {(0, 2), (1, 2)}, report.moves  # two sources
        assert applied_after < cfg.train.steps, "the slots moved after training had finished"
        np.testing.assert_allclose(result.train_losses, local.train_losses, rtol=1e-6, atol=0)
        with SyncShardClient.connect(cfg) as shards:
            stats = shards.stats()
            assert sorted(len(st.slots) for st in stats.values()) == [5, 5, 6]
            assert {t.applied_step for st in stats.values() for t in st.tables} == {cfg.train.steps}
        for layer, rows in pull_tables(cfg).items():
            torch.testing.assert_close(rows, local_model.tables[str(layer)].weight.detach(), rtol=0, atol=1e-6)
    finally:
        cluster.stop()


def replicated_run(root, name: str, data, *, fault: bool):
    """Sync Ray training (2 workers) on 3 shards with replicas=2 -> (result, exported model, events)."""
    from trainer.ray_trainer import train_ray

    ov = overrides(root, name, *FAST, "train.steps=10")
    cluster = LocalCluster(
        preset="tiny",
        overrides=ov,
        num_shards=3,
        replicas=2,
        log_dir=root / f"{name}-logs",
        startup_timeout_s=90,
        shard_args=["--threads", "2"],
    ).start()
    try:
        cfg = load_config("tiny", None, ov + cluster.cluster_overrides)
        faults = KillRestart(cluster, 2)
        watcher = faults.when_applied(cfg, kill=3, restart=5) if fault else None
        result = train_ray(cfg, data=data)
        if watcher is not None:
            watcher.join(240)
            assert not faults.errors, faults.errors
            assert faults.kills == 1 and faults.restarts == 1
            wait_for("shard 2 rebuilt", lambda: fully_replicated(cluster, {0, 1, 2}), timeout_s=120)
        model, _, _ = load_model(result.checkpoint)
        return result, model, [e["kind"] for e in events(cluster)]
    finally:
        cluster.stop()


@pytest.mark.timeout(900)  # two Ray runs on 3 shards each; minutes on a loaded 2-core box
def test_two_ray_workers_survive_a_killed_shard_with_equal_weights(ray_session, workdir, reference) -> None:  # noqa: F811
    _, data, _, _ = reference
    clean, clean_model, _ = replicated_run(workdir, "r2-clean", data, fault=False)
    hit, hit_model, kinds = replicated_run(workdir, "r2-kill", data, fault=True)
    assert "failover" in kinds and "repaired" in kinds, kinds
    assert len(hit.train_losses) == len(clean.train_losses) == 10
    np.testing.assert_allclose(hit.train_losses, clean.train_losses, rtol=1e-6, atol=0)
    want = clean_model.state_dict()
    for name, p in hit_model.state_dict().items():  # dense weights and the tables pulled back
        torch.testing.assert_close(p, want[name], rtol=0, atol=1e-6, msg=name)
