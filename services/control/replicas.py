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
    sources: dict[int, list[int]]  # live holder -> the slots copied from it
    target: int
    owners: list[int]
    replicas: list[list[int]]  # the map once the target holds the slots

    @property
    def slots(self) -> list[int]:
        return sorted(s for slots in self.sources.values() for s in slots)


def plan_repair(owners: list[int], replicas: list[list[int]], *, want: int, target: int) -> Repair | None:
    """Copies for an empty live shard `target`: every under-replicated slot, each from one live
    holder (the one that holds the most of them, the lowest id on a tie, so few sources freeze).

    The target holds nothing until the map lists it, so no client has counted it as having
    applied a step its copies lack; slots copied from different sources may stand at different
    steps, which a shard keeps per slot (services/shard/ownership.py).
    """
    short = [
        s
        for s in range(len(owners))
        if len(holders(owners, replicas, s)) < want and target not in holders(owners, replicas, s)
    ]
    if not short:
        return None
    count: dict[int, int] = {}
    for slot in short:
        for h in holders(owners, replicas, slot):
            count[h] = count.get(h, 0) + 1
    sources: dict[int, list[int]] = {}
    for slot in short:
        best = max(sorted(holders(owners, replicas, slot)), key=lambda h: count[h])
        sources.setdefault(best, []).append(slot)
    new_replicas = [list(rs) for rs in (replicas or [[] for _ in owners])]
    for slot in short:
        new_replicas[slot].append(target)
    return Repair(sources=sources, target=target, owners=list(owners), replicas=new_replicas)


@dataclass(frozen=True, slots=True)
class ReplicaMoves:
    owners: list[int]  # the new primary per slot
    replicas: list[list[int]]  # the new other holders per slot
    copies: dict[tuple[int, int], list[int]]  # (source, target) -> slots the target gets a copy of

    @property
    def num_copied(self) -> int:
        return sum(len(s) for s in self.copies.values())


def plan_replica_moves(
    owners: list[int], replicas: list[list[int]], *, primaries: list[int], targets: list[int], want: int
) -> ReplicaMoves:
    """Holder sets over `targets` with `want` copies per slot, the primaries `primaries` (a
    plan_slot_map result), every target holding floor/ceil of the copies, few copies made.

    Each slot keeps the old holders that stay, the new primary first; slots short of `want`
    take the least-loaded targets; then replicas move from the fullest to the emptiest target
    until loads differ by at most one. A new holder copies the slot from its old primary (the
    first old holder still listed): old holders keep serving and applying updates until the
    new map is installed, so a slot never has fewer than `want` copies while it moves.
    """
    ts = sorted(set(targets))
    if not 1 <= want <= len(ts):
        raise ValueError(f"replicas: {want} copies of each slot need as many target shards, got {ts}")
    new_reps: list[list[int]] = []
    load = dict.fromkeys(ts, 0)
    for s, p in enumerate(primaries):
        kept = [h for h in holders(owners, replicas, s) if h in load and h != p][: want - 1]
        new_reps.append(kept)
        for h in (p, *kept):
            load[h] += 1
    for s, p in enumerate(primaries):
        while len(new_reps[s]) < want - 1:
            t = min((t for t in ts if t != p and t not in new_reps[s]), key=lambda t: (load[t], t))
            new_reps[s].append(t)
            load[t] += 1
    for _ in range(len(owners) * want):  # balance: move a replica from the fullest to the emptiest
        hi = max(ts, key=lambda t: (load[t], -t))
        lo = min(ts, key=lambda t: (load[t], t))
        if load[hi] - load[lo] <= 1:
            break
        slot = next(
            (s for s in range(len(owners)) if hi in new_reps[s] and lo not in new_reps[s] and primaries[s] != lo), None
        )
        if slot is None:
            break
        new_reps[slot][new_reps[slot].index(hi)] = lo
        load[hi] -= 1
        load[lo] += 1
    copies: dict[tuple[int, int], list[int]] = {}
    for s, p in enumerate(primaries):
        old = holders(owners, replicas, s)
        for h in (p, *new_reps[s]):
            if h not in old:
                copies.setdefault((old[0], h), []).append(s)
    return ReplicaMoves(owners=list(primaries), replicas=new_reps, copies=copies)
