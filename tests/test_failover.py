"""Replicated slots (cluster.replicas=2) through shard failures, on real Redis and real shard processes.

- the pure replica math (placement, failover, repair plans, the client's holder matrix);
- lookups under a steady load through kill -9, restart + rebuild from the live replica,
  SIGSTOP and SIGCONT of a shard: 0 failed requests, every row exact;
- sync training through a SIGKILL of a shard and its restart: final tables and dense weights
  equal an unfaulted run of the same cluster shape to 1e-6, and both replicas hold the same rows.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from benchmarks.fault_harness import (
    KillRestart,
    LookupLoad,
    events,
    fully_replicated,
    holder_rows,
    slot_map,
    train_remote,
    wait_for,
)
from engram.config import load_config
from engram.data import prepare_data
from engram.layout import table_layouts
from services.client.replicas import alternate_owners, holder_matrix
from services.control.replicas import drop_shards, held_by, place_replicas, plan_repair
from tests.corpus import write_code_corpus
from tests.fixtures_cluster import ShardProcess, shard_procs, start_all  # noqa: F401
from tests.fixtures_procs import expected_rows, secure_cluster

pytestmark = pytest.mark.timeout(180)
FAST = [
    "cluster.heartbeat_s=0.2",
    "cluster.heartbeat_ttl_s=1.5",
    "cluster.failover_check_s=0.1",
    "cluster.replica_switch_s=0.5",
]


# ---------------------------------------------------------------------------------------------
# pure


def test_replica_placement_failover_and_repair_plans():
    owners = [0, 1, 2, 0, 1, 2]
    reps = place_replicas(owners, 2)
    assert reps == [[1], [2], [0], [1], [2], [0]]
    assert held_by(owners, reps, 1) == [0, 1, 3, 4]
    with pytest.raises(ValueError, match="need as many shards"):
        place_replicas(owners, 4)
    f = drop_shards(owners, reps, {1})
    assert f.owners == [0, 2, 2, 0, 2, 2] and f.replicas == [[], [], [0], [], [], [0]]
    assert f.promoted == {1: 2, 4: 2} and f.lost == []
    both = drop_shards(owners, reps, {0, 1})
    assert both.lost == [0, 3] and both.owners[0] == 0  # nothing to promote: left as it was
    # shard 1 returns empty: every short slot at once, each from the holder that has the most of them
    r = plan_repair(f.owners, f.replicas, want=2, target=1)
    assert r is not None and r.sources == {0: [0, 3], 2: [1, 4]} and r.slots == [0, 1, 3, 4]
    assert all(1 in r.replicas[s] for s in r.slots)
    assert plan_repair(r.owners, r.replicas, want=2, target=1) is None
    # every slot on every shard (R = N): the survivor that holds them all is the one source
    full = drop_shards([0, 1, 2], place_replicas([0, 1, 2], 3), {2})
    r3 = plan_repair(full.owners, full.replicas, want=3, target=2)
    assert r3 is not None and r3.sources == {0: [0, 1, 2]}


def test_client_holder_matrix_and_alternates():
    h = holder_matrix([0, 1, 2], [[1], [2], []])
    assert h is not None and h.tolist() == [[0, 1], [1, 2], [2, -1]]
    assert alternate_owners(h, {1}).tolist() == [0, 2, 2]
    assert alternate_owners(h, {0, 1}).tolist() == [-1, 2, 2]
    assert alternate_owners(h, {2}).tolist() == [0, 1, -1]
    assert holder_matrix([0, 1], []) is None  # cluster.replicas=1
    degraded = holder_matrix([0, 1], [[], []])  # replicated, one copy left: still routed as replicated
    assert degraded is not None and degraded.tolist() == [[0], [1]]


# ---------------------------------------------------------------------------------------------
# inference lookups through kill -9, restart, SIGSTOP, SIGCONT


def test_lookups_survive_kill_restart_and_stop_with_zero_failures(tmp_path):
    over = [*FAST, "cluster.wire_dtype=fp32", "cluster.row_path=tcp"]  # tcp: a stopped shard answers nothing
    cluster = secure_cluster(over, num_shards=2, replicas=2, log_dir=tmp_path / "logs")
    with cluster:
        cfg = load_config("tiny", None, [*over, *cluster.cluster_overrides, *cluster.client_overrides("read")])
        table, layout = next(iter(table_layouts(cfg.engram).items()))
        smap = slot_map(cluster)
        assert [len(smap.holders(s)) for s in range(cfg.cluster.num_slots)] == [2] * cfg.cluster.num_slots
        ids = np.arange(layout.num_rows, dtype=np.int64)
        with LookupLoad(cfg, table, ids, want=expected_rows(cfg, table, ids, dtype=torch.float32)) as load:
            load.wait_more()
            faults = KillRestart(cluster, 1)
            faults.kill()
            t_kill = time.monotonic()
            smap = wait_for("failover", lambda: (m := slot_map(cluster)).all_holders() == {0} and m)
            assert (
                time.monotonic() - t_kill < 10.0
            )  # the heartbeat TTL, not a deadline (timing: benchmarks/failover.py)
            assert smap.owners == [0] * cfg.cluster.num_slots
            load.wait_more()
            faults.restart()  # boots empty, rebuilt from shard 0
            wait_for("repair", lambda c=cluster: fully_replicated(c, {0, 1}))
            load.wait_more()
            os.kill(cluster.shards[0].pid, signal.SIGSTOP)
            try:
                t_stop = time.monotonic()
                wait_for("failover from the stopped shard", lambda: slot_map(cluster).all_holders() == {1})
                assert time.monotonic() - t_stop < 10.0
                load.wait_more()
            finally:
                os.kill(cluster.shards[0].pid, signal.SIGCONT)
            wait_for("the resumed shard fenced and rebuilt", lambda c=cluster: fully_replicated(c, {0, 1}))
            load.wait_more()
        assert load.failed == 0, load.errors[:3]
        assert load.wrong == 0 and load.ok >= 15
        assert load.client.replica_switches > 0  # requests did move to the other holder
        kinds = [e["kind"] for e in events(cluster)]
        assert kinds.count("failover") >= 2 and kinds.count("repaired") >= 2, kinds
        assert "fenced" in kinds, kinds


# ---------------------------------------------------------------------------------------------
# sync training through a SIGKILL


def test_sync_training_survives_a_killed_shard_with_equal_weights(tmp_path):
    """Kill -9 shard 1 inside step 4, restart it before step 7 (rebuilt from shard 0 while training goes on).

    The unfaulted reference is single-process training with local tables, which sync training
    on the shards equals bit for bit (tests/test_remote_training.py, benchmarks/sync_equivalence.py);
    benchmarks/failover.py also compares against an unfaulted R=2 cluster run.
    """
    from engram.checkpoint import load_model
    from trainer.local import train_local

    write_code_corpus(tmp_path / "corpus.txt")
    steps = 10
    base = [
        *FAST,
        f'train.corpus=["{tmp_path / "corpus.txt"}"]',
        f"tokenizer.cache_dir={tmp_path / 'cache'}",
        "train.progress=false",
        "cluster.wire_dtype=fp32",
        f"train.steps={steps}",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    data = prepare_data(load_config("tiny", None, base))
    cluster = secure_cluster(base, num_shards=2, replicas=2, log_dir=tmp_path / "logs", shard_args=["--threads", "2"])
    with cluster:
        cfg = load_config("tiny", None, [*base, *cluster.cluster_overrides, *cluster.client_overrides("train")])
        # kill -9 inside step 4 (its lookups, compute or push); restarted before step 7, rebuilt while training goes on
        fault = KillRestart(cluster, 1).at_steps(kill=3, restart=6)
        losses, dense, rows = train_remote(cfg, data, steps=steps, on_step=fault)
        try:
            smap = wait_for("two holders per slot", lambda: fully_replicated(cluster, {0, 1}))
            assert min(rows.applied_steps().values()) == steps
            tables = {t: rows.pull_table(t) for t in cfg.engram.layer_ids}
            addresses = rows.client.addresses
            copies = {
                t: [holder_rows(cfg, smap, addresses, shard_id=s, table=t, n=tables[t].shape[0]) for s in (0, 1)]
                for t in cfg.engram.layer_ids
            }
        finally:
            rows.close()
        kinds = [e["kind"] for e in events(cluster)]
    assert "failover" in kinds and "repaired" in kinds, kinds
    for t, (a, b) in copies.items():
        assert torch.equal(a, b), f"table {t}: the replicas differ"
    local = train_local(load_config("tiny", None, base), data=data)
    model, _, _ = load_model(local.checkpoint)
    np.testing.assert_allclose(losses, local.train_losses, rtol=1e-6, atol=0)
    for t, rows_t in tables.items():
        torch.testing.assert_close(rows_t, model.tables[str(t)].weight.detach(), rtol=0, atol=1e-6)
    reference = model.state_dict()
    assert dense and set(dense) <= set(reference)
    for name, p in dense.items():
        torch.testing.assert_close(p, reference[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# the shard side of a failover elsewhere: an epoch-only SetSlotMap


def test_epoch_only_slot_map_moves_the_epoch_while_a_step_collects_parts(shard_procs):  # noqa: F811
    import grpc

    from engram.layout import even_slot_map
    from proto.shard.v1 import shard_pb2
    from tests.test_shard_server import Client, expect_error, rows_of

    cfg = load_config("tiny")
    table = next(iter(table_layouts(cfg.engram)))
    dim = table_layouts(cfg.engram)[table].dim
    owners = even_slot_map(cfg.cluster.num_slots, 2)
    proc = ShardProcess(["--preset", "tiny", "--standalone", "--shard-id", "0"])
    shard_procs.append(proc)
    start_all([proc])
    c = Client(proc.address)
    try:
        mine = rows_of(owners, 0)[:4]
        assert c.apply(mine, torch.ones(4, dim), step=1, part="w0", num_parts=2).pending  # half a step
        owned = [s for s, o in enumerate(owners) if o == 0]
        reply = c.stub.SetSlotMap(shard_pb2.SetSlotMapRequest(epoch=2, owned_slots=owned, owners=owners), timeout=10)
        assert reply.slots_dropped == 0
        assert c.stub.Stats(shard_pb2.StatsRequest(), timeout=5).epoch == 2
        expect_error(lambda: c.lookup(mine, epoch=1), grpc.StatusCode.FAILED_PRECONDITION, "stale")
        done = c.apply(mine, torch.ones(4, dim), step=1, epoch=2, part="w1", num_parts=2)
        assert not done.pending and done.applied_step == 1  # the step kept its first part across the new map
        assert not torch.equal(c.lookup(mine, epoch=2), expected_rows(cfg, table, mine, dtype=torch.float32))
        expect_error(
            lambda: c.stub.SetSlotMap(shard_pb2.SetSlotMapRequest(epoch=1 << 40, owned_slots=owned), timeout=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_epoch_jump",
        )
    finally:
        c.close()
