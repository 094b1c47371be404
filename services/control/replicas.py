"""Pure replica-set math: where each slot's copies live, who takes over, what to rebuild.

A slot's holders are `[owners[slot], *replicas[slot]]`: the primary first, then its replicas,
all on different shards. Every holder serves lookups of the slot and applies every update
of it (the client sends each update to every holder; the optimizer is deterministic, so the
copies stay bit-identical). Failing over = dropping a dead shard from every holder list; the
first live holder left is the new primary. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass


def place_replicas(owners: list[int], replicas: int) -> list[list[int]]:
    """Primary per slot -> replicas - 1 more holders per slot, the next shards in id order."""
    shards = sorted(set(owners))
    if replicas < 1:
        raise ValueError(f"replicas: must be >= 1, got {replicas}")
    if replicas > len(shards):
        raise ValueError(f"replicas: {replicas} copies of each slot need as many shards, the map has {len(shards)}")
    index = {s: i for i, s in enumerate(shards)}
    n = len(shards)
    return [[shards[(index[o] + k) % n] for k in range(1, replicas)] for o in owners]


def holders(owners: list[int], replicas: list[list[int]], slot: int) -> list[int]:
    return [owners[slot], *(replicas[slot] if replicas else [])]


def held_by(owners: list[int], replicas: list[list[int]], shard_id: int) -> list[int]:
    """The slots `shard_id` holds, as primary or replica."""
    return [s for s in range(len(owners)) if shard_id in holders(owners, replicas, s)]


def view_for(owners: list[int], replicas: list[list[int]], shard_id: int) -> list[int]:
    """The owners list one shard installs: itself for every slot it holds, the primary elsewhere."""
    return [shard_id if shard_id in holders(owners, replicas, s) else o for s, o in enumerate(owners)]


def all_holders(owners: list[int], replicas: list[list[int]]) -> set[int]:
    return set(owners) | {h for rs in replicas for h in rs}


@dataclass(frozen=True, slots=True)
class Failover:
    owners: list[int]
    replicas: list[list[int]]
    promoted: dict[int, int]  # slot -> its new primary (was a replica)
    lost: list[int]  # slots whose every holder is in `dead`: left as they were (nothing to promote)


def drop_shards(owners: list[int], replicas: list[list[int]], dead: set[int]) -> Failover:
    """Remove `dead` shards from every holder list; the first live holder becomes the primary."""
    new_owners, new_replicas, promoted, lost = [], [], {}, []
    for slot in range(len(owners)):
        hs = holders(owners, replicas, slot)
        live = [h for h in hs if h not in dead]
        if not live:
            lost.append(slot)
            live = hs
        elif live[0] != hs[0]:
            promoted[slot] = live[0]
        new_owners.append(live[0])
        new_replicas.append(live[1:])
    return Failover(owners=new_owners, replicas=new_replicas, promoted=promoted, lost=lost)


@dataclass(frozen=True, slots=True)
class Repair:
    source: int  # a live holder the slots are copied from
    target: int
    slots: list[int]
    owners: list[int]
    replicas: list[list[int]]  # the map once the target holds the slots


def plan_repair(owners: list[int], replicas: list[list[int]], *, want: int, target: int) -> Repair | None:
    """Copies for an empty live shard `target`: the under-replicated slots that ONE source holds.

    One source and one MigrateSlots freeze make the copy consistent at one applied step, which
    is what lets a writer count a step that the copy already holds as applied (docs/failover.md).
    The source is the holder (primary or replica) of the most such slots, the lowest id on a tie;
    the rest wait for the next round (or another empty shard).
    """
    short = [
        s
        for s in range(len(owners))
        if len(holders(owners, replicas, s)) < want and target not in holders(owners, replicas, s)
    ]
    if not short:
        return None
    by_source: dict[int, list[int]] = {}
    for slot in short:
        for h in holders(owners, replicas, slot):
            by_source.setdefault(h, []).append(slot)
    source = max(sorted(by_source), key=lambda h: len(by_source[h]))
    slots = by_source[source]
    new_replicas = [list(rs) for rs in (replicas or [[] for _ in owners])]
    for slot in slots:
        new_replicas[slot].append(target)
    return Repair(source=source, target=target, slots=slots, owners=list(owners), replicas=new_replicas)
