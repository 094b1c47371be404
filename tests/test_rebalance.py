"""Rebalancing: the slot-map plan (pure) and a live 2 -> 3 shard move under lookup load."""

from __future__ import annotations

import asyncio
import collections

import grpc
import numpy as np
import pytest
import torch

from engram.layout import even_slot_map
from engram.row_optim import AdamParams, lazy_adam_
from services.client import ShardClient, ShardError
from services.control.rebalance import plan_slot_map, rebalance, target_shards
from services.launcher import LocalCluster
from tests.fixtures_procs import cluster_fixture, expected_rows, run


def counts(owners: list[int]) -> dict[int, int]:
    return dict(collections.Counter(owners))


def lower_bound(owners: list[int], targets: list[int]) -> int:
    """Slots that must move: those of leaving shards plus what the over-full ones must give up."""
    n, held = len(owners), counts(owners)
    base, extra = divmod(n, len(targets))
    by_size = sorted(targets, key=lambda t: -held.get(t, 0))
    quota = {t: base + (i < extra) for i, t in enumerate(by_size)}
    return sum(c for s, c in held.items() if s not in quota) + sum(max(0, held.get(t, 0) - quota[t]) for t in targets)


def test_grow_two_to_three_moves_only_what_the_new_shard_needs() -> None:
    owners = even_slot_map(16, 2)
    plan = plan_slot_map(owners, [0, 1, 2])
    assert sorted(counts(plan.owners).values()) == [5, 5, 6]
    assert plan.num_moved == 5
    assert set(plan.moves) <= {(0, 2), (1, 2)}
    assert all(plan.owners[s] == 2 for slots in plan.moves.values() for s in slots)
    unmoved = [s for s in range(16) if plan.owners[s] == owners[s]]
    assert len(unmoved) == 11


def test_shrink_moves_only_the_leaving_shards_slots() -> None:
    owners = even_slot_map(12, 3)
    plan = plan_slot_map(owners, [0, 2])
    assert counts(plan.owners) == {0: 6, 2: 6}
    assert plan.num_moved == 4
    assert all(src == 1 for src, _ in plan.moves)


def test_balanced_map_is_left_alone() -> None:
    owners = even_slot_map(16, 4)
    plan = plan_slot_map(owners, [0, 1, 2, 3])
    assert plan.owners == owners and plan.moves == {}


@pytest.mark.parametrize("seed", range(20))
def test_random_maps_are_balanced_with_minimal_moves(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 64))
    owners = rng.integers(0, 5, size=n).tolist()
    targets = sorted(set(rng.integers(0, 7, size=int(rng.integers(1, 5))).tolist()))
    plan = plan_slot_map(owners, targets)
    sizes = [counts(plan.owners).get(t, 0) for t in targets]
    assert set(plan.owners) <= set(targets) and max(sizes) - min(sizes) <= 1
    assert plan.num_moved == lower_bound(owners, targets)
    moved = {s for slots in plan.moves.values() for s in slots}
    assert moved == {s for s in range(n) if plan.owners[s] != owners[s]}
    for (src, dst), slots in plan.moves.items():
        assert all(owners[s] == src and plan.owners[s] == dst for s in slots)


def test_targets_and_bad_requests() -> None:
    owners = [0, 0, 1, 1]
    assert target_shards(owners, num_shards=3) == [0, 1, 2]
    assert target_shards(owners, add=[5]) == [0, 1, 5]
    assert target_shards(owners, remove=[0]) == [1]
    with pytest.raises(ValueError, match="either"):
        target_shards(owners, num_shards=2, add=[3])
    with pytest.raises(ValueError, match="no owner"):
        target_shards(owners, remove=[0, 1])
    with pytest.raises(ValueError, match="only 4 slots"):
        plan_slot_map(owners, range(5))


# ---------------------------------------------------------------------------------------------
# live: real Redis, real shards

cluster = cluster_fixture(num_shards=2, overrides=["engram.table_size_per_ngram=[20011,20011]"])


@pytest.mark.timeout(90)
def test_live_rebalance_two_to_three_under_lookups(cluster: LocalCluster) -> None:
    async def main() -> None:
        cp = cluster.control()
        read, train = cluster.security("read"), cluster.security("train")  # a worker's and a trainer's identity
        client = await ShardClient.connect(cp, security=read)  # keeps looking up throughout
        stale = await ShardClient.connect(cp, security=read)  # at epoch 1, first used after the move
        pusher = await ShardClient.connect(cp, wire_dtype="fp32", security=train)  # pushes with the old map
        cfg, n = client.cfg, client.layouts[1].num_rows
        standalone = ShardClient(cfg, epoch=1, owners=client.owners, addresses=cluster.addresses, security=read)
        stop, epochs, bad = asyncio.Event(), [], []

        async def load() -> None:
            rng = np.random.default_rng(0)
            while not stop.is_set():
                ids = rng.integers(0, n, size=(8, 250))
                rows = await client.lookup(1, ids, timeout_s=20)
                if not torch.equal(rows, expected_rows(cfg, 1, ids)):
                    bad.append(client.epoch)
                epochs.append(client.epoch)

        task = asyncio.create_task(load())
        try:
            await asyncio.sleep(0.3)
            assert await cluster.aadd_shard() == 2
            report = await rebalance(cp, num_shards=3, security=cluster.security("admin"))
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await task
        try:
            assert (report.old_epoch, report.new_epoch) == (1, 2)
            assert set(report.moves) <= {(0, 2), (1, 2)} and sum(map(len, report.moves.values())) == 5
            assert not bad, f"{len(bad)} lookups returned wrong rows"
            assert epochs.count(1) >= 1 and epochs.count(2) >= 1, f"lookups per epoch: {collections.Counter(epochs)}"
            stats = await client.stats()
            assert sorted(len(st.slots) for st in stats.values()) == [5, 5, 6]
            assert {st.epoch for st in stats.values()} == {2}

            # a client still at epoch 1: FAILED_PRECONDITION from the shards -> refresh -> right rows
            ids = np.arange(0, n, 37)
            assert stale.epoch == 1
            assert torch.equal(await stale.lookup(1, ids), expected_rows(cfg, 1, ids))
            assert stale.epoch == 2

            # without a control plane the stale epoch is a clear error
            with pytest.raises(ShardError) as info:
                await standalone.lookup(1, ids)
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "refresh" in str(info.value)

            # a gradient pushed with the old map: refused by every shard before any change, re-sent once
            rows = np.random.default_rng(5).choice(n, size=300, replace=False)
            grads = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
            opt = {"kind": "adam", "lr": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
            assert pusher.epoch == 1
            result = await pusher.apply_gradients(1, rows, grads, step=1, optimizer=opt)
            assert pusher.epoch == 2 and set(result.shards) == {0, 1, 2} and result.rows_updated == 300
            w = expected_rows(cfg, 1, rows, dtype=torch.float32).clone()
            lazy_adam_(
                w,
                torch.zeros_like(w),
                torch.zeros_like(w),
                g=grads,
                step=1,
                p=AdamParams(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8),
            )
            torch.testing.assert_close(await pusher.lookup(1, rows), w, rtol=1e-6, atol=1e-6)
        finally:
            for c in (client, stale, pusher, standalone):
                await c.close()
            await cp.close()

    run(main(), timeout_s=80)


failing_cluster = cluster_fixture(num_shards=2, overrides=["engram.table_size_per_ngram=[20011,20011]"])


def test_failed_rebalance_leaves_the_old_map_serving_updates(failing_cluster: LocalCluster, monkeypatch) -> None:
    """Slots are frozen for updates while they migrate; if the slot-map CAS then fails, the rebalancer
    re-installs the old map on the sources and the frozen slots take gradients again."""

    async def main() -> None:
        cp = failing_cluster.control()
        pusher = await ShardClient.connect(cp, wire_dtype="fp32", security=failing_cluster.security("train"))
        try:
            assert await failing_cluster.aadd_shard() == 2

            async def lost_race(*args, **kwargs):
                raise ValueError("slot map changed (epoch 2, expected 1)")

            monkeypatch.setattr(cp, "set_slot_map", lost_race)
            with pytest.raises(ValueError, match="slot map changed"):
                await rebalance(cp, num_shards=3, security=failing_cluster.security("admin"))
            monkeypatch.undo()
            assert (await cp.slot_map()).epoch == 1
            n = pusher.layouts[1].num_rows
            rows = np.arange(n, dtype=np.int64)[:400]  # covers every slot, the migrated ones included
            grads = torch.ones(rows.size, 8)
            opt = {"kind": "adam", "lr": 0.05, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
            result = await pusher.apply_gradients(1, rows, grads, step=1, optimizer=opt)
            assert result.rows_updated == rows.size and pusher.epoch == 1
        finally:
            await pusher.close()
            await cp.close()

    run(main(), timeout_s=80)
