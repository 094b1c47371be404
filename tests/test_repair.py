"""More shards than replicas (3 shards, cluster.replicas=2), on real Redis and real shard processes.

- a killed shard that returns is rebuilt from every live replica (two sources), while updates go on;
  afterwards every holder of every slot holds the same rows, equal to a single-process reference;
- `rebalance` of a replicated cluster (2 -> 3 shards) moves primaries and replicas with updates
  going on: R copies of every slot, balanced, no update lost;
- the pure plans (replica sets for a rebalance).
"""

from __future__ import annotations

import asyncio
import collections

import numpy as np
import pytest
import torch

from benchmarks.fault_harness import (
    KillRestart,
    Pusher,
    events,
    fully_replicated,
    holder_slot_rows,
    slot_map,
    wait_for,
)
from engram.config import load_config
from engram.layout import even_slot_map
from services.control.rebalance import plan_slot_map, rebalance
from services.control.replicas import holders, place_replicas, plan_replica_moves
from services.launcher import LocalCluster
from tests.fixtures_procs import run, secure_cluster

pytestmark = pytest.mark.timeout(240)
FAST = [
    "cluster.heartbeat_s=0.2",
    "cluster.heartbeat_ttl_s=1.5",
    "cluster.failover_check_s=0.1",
    "cluster.replica_switch_s=0.5",
    "cluster.wire_dtype=fp32",
]


# ---------------------------------------------------------------------------------------------
# pure


@pytest.mark.parametrize(("before", "after", "want"), [(2, 3, 2), (3, 4, 2), (3, 2, 2), (4, 3, 3), (2, 4, 2)])
def test_replica_moves_keep_r_distinct_balanced_holders(before: int, after: int, want: int) -> None:
    owners = even_slot_map(16, before)
    reps = place_replicas(owners, want)
    primaries = plan_slot_map(owners, range(after)).owners
    plan = plan_replica_moves(owners, reps, primaries=primaries, targets=list(range(after)), want=want)
    load = collections.Counter(h for s in range(16) for h in holders(plan.owners, plan.replicas, s))
    assert plan.owners == primaries
    for s in range(16):
        hs = holders(plan.owners, plan.replicas, s)
        assert len(hs) == want and len(set(hs)) == want and set(hs) <= set(range(after))
    assert max(load.values()) - min(load.values()) <= 1 and set(load) == set(range(after))
    for (src, dst), slots in plan.copies.items():  # every new holder copies from an old holder
        for s in slots:
            assert src in holders(owners, reps, s) and dst not in holders(owners, reps, s)
            assert dst in holders(plan.owners, plan.replicas, s)
    new_copies = sum(
        len(set(holders(plan.owners, plan.replicas, s)) - set(holders(owners, reps, s))) for s in range(16)
    )
    assert plan.num_copied == new_copies
    kept = sum(len(set(holders(plan.owners, plan.replicas, s)) & set(holders(owners, reps, s))) for s in range(16))
    assert kept >= 16 * want - plan.num_copied  # nothing copied that was already there


# ---------------------------------------------------------------------------------------------
# live


def check_every_holder(cluster: LocalCluster, cfg, pusher: Pusher) -> dict[int, list[int]]:
    """Every holder's copy of every slot equals the single-process reference -> shard -> slots held."""
    smap = slot_map(cluster)
    want = pusher.reference()  # (R, D)
    n = want.shape[0]
    ids = np.arange(n, dtype=np.int64)
    held = {}
    for shard in sorted(smap.all_holders()):
        slots = smap.held_by(shard)
        mine = ids[np.isin(ids % cfg.cluster.num_slots, slots)]
        got = holder_slot_rows(cfg, smap, cluster.addresses, shard_id=shard, table=pusher.table, ids=mine)
        assert torch.equal(got, want[torch.from_numpy(mine)]), f"shard {shard}: rows differ from the reference"
        held[shard] = slots
    whole = pusher.rows.pull_table(pusher.table)  # through the normal client: any holder
    assert torch.equal(whole, want)
    steps = pusher.rows.applied_steps()
    assert steps[pusher.table] == pusher.step, steps
    return held


def test_a_returning_shard_is_rebuilt_from_every_live_replica(tmp_path) -> None:
    cluster = secure_cluster(FAST, num_shards=3, replicas=2, log_dir=tmp_path / "logs")
    with cluster:  # the pusher is a trainer: the train identity
        cfg = load_config("tiny", None, [*FAST, *cluster.cluster_overrides, *cluster.client_overrides("train")])
        table = cfg.engram.layer_ids[0]
        before = slot_map(cluster)
        lost = before.held_by(2)
        assert {h for s in lost for h in before.holders(s)} - {2} == {0, 1}  # its slots live on both survivors
        faults = KillRestart(cluster, 2)
        with Pusher(cfg, table) as pusher:
            pusher.push(2)
            faults.kill()
            pusher.push(2)  # answered once the leader fenced shard 2 (its copies stop being waited for)
            smap = wait_for("failover", lambda: 2 not in (m := slot_map(cluster)).all_holders() and m)
            assert all(len(smap.holders(s)) == 1 for s in lost)
            pusher.start()  # updates go on while shard 2 restarts and is rebuilt from both survivors
            faults.restart()
            wait_for("rebuilt", lambda: fully_replicated(cluster, {0, 1, 2}), timeout_s=90)
            wait_for("a step after the rebuild", lambda s=pusher.step: pusher.step >= s + 2, timeout_s=60)
            pusher.stop()
            pusher.push(2)
            held = check_every_holder(cluster, cfg, pusher)
        assert held[2] == lost, "shard 2 is rebuilt with the slots it held"
        repairs = [e for e in events(cluster) if e["kind"] == "repaired"]
        assert len(repairs) == 1, repairs  # one round: every lost slot, from both survivors
        assert repairs[0]["sources"] == [0, 1] and repairs[0]["target"] == 2 and repairs[0]["slots"] == len(lost)


def test_rebalance_moves_replica_sets_while_updates_go_on(tmp_path) -> None:
    cluster = secure_cluster(FAST, num_shards=2, replicas=2, log_dir=tmp_path / "logs")
    with cluster:  # the pusher is a trainer: the train identity
        cfg = load_config("tiny", None, [*FAST, *cluster.cluster_overrides, *cluster.client_overrides("train")])
        table = cfg.engram.layer_ids[0]
        assert cluster.add_shard() == 2  # registered, holds nothing until the rebalance
        with Pusher(cfg, table) as pusher:
            pusher.push(2)
            pusher.start()

            async def move():
                cp = cluster.control()
                try:
                    return await rebalance(cp, num_shards=3, timeout_s=120, security=cluster.security("admin"))
                finally:
                    await cp.close()

            report = run(move(), timeout_s=150)
            wait_for("steps after the move", lambda s=pusher.step: pusher.step >= s + 2, timeout_s=60)
            pusher.stop()
            pusher.push(1)
            held = check_every_holder(cluster, cfg, pusher)
        smap = slot_map(cluster)
        assert report.new_epoch == report.old_epoch + 1 and report.moves
        assert all(dst == 2 for _, dst in report.moves)
        assert all(len(set(smap.holders(s))) == 2 for s in range(cfg.cluster.num_slots))
        assert sorted(len(v) for v in held.values()) == [10, 11, 11]
        assert sorted(collections.Counter(smap.owners).values()) == [5, 5, 6]


def test_rebalance_refuses_a_cluster_still_missing_copies() -> None:
    async def main() -> None:
        class Control:  # a map whose slot 1 lost its replica
            async def slot_map(self):
                from services.control.store import SlotMap

                return SlotMap(epoch=3, owners=[0, 1], replicas=[[1], []])

            async def config(self):
                return load_config("tiny", None, ["cluster.replicas=2"])

        with pytest.raises(ValueError, match=r"slots \[1\] .* fewer than cluster.replicas=2"):
            await rebalance(Control(), num_shards=2)

    asyncio.run(main())
