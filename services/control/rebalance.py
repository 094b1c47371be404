"""Grow or shrink the cluster by moving whole slots, while lookups go on.

    plan = plan_slot_map(owners, targets)                # pure: fewest slots moved
    await rebalance(control, num_shards=3)               # or add=[3] / remove=[1]

Steps (see services/shard/migrate.py for the shard side):
  1. every target shard must be registered and alive (a joining shard is started first and
     owns no slots until the map gives it some);
  2. for each (source, target) pair: `MigrateSlots(slots, target, epoch)` on the source,
     which freezes the slots for updates (lookups go on) and streams them to the target;
  3. compare-and-set the new map in the control plane (epoch + 1);
  4. `SetSlotMap(epoch + 1, owned)` on every shard, gainers first: they swap staged slots in,
     losers drop theirs. Clients still on the old epoch get FAILED_PRECONDITION and refresh;
     clients already on the new one get UNAVAILABLE from a shard that has not switched yet
     and retry.
Re-running `rebalance` with nothing to move re-sends step 4, which repairs shards that
missed it.

With replicas (cluster.replicas = R > 1) the replica sets move too (replicas.plan_replica_moves):
every new holder of a slot receives a copy from the slot's old primary in step 2; old holders keep
serving and applying updates until step 4, so a slot never has fewer than R copies. A map with
slots short of R copies (a failed shard not rebuilt yet) is refused. A target shard may receive
slots from several sources at different steps: shards keep one applied step per slot
(services/shard/ownership.py).

During sync training a shard refuses MigrateSlots and SetSlotMap while a step is collecting
its workers' parts (FAILED_PRECONDITION); steps 2 and 4 retry until the step is applied, which
the next step's parts cannot delay: once slots are frozen, parts touching them are refused
(UNAVAILABLE) and the trainer's client re-sends them after the new map is installed.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.control.replicas import plan_replica_moves

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SlotPlan:
    owners: list[int]  # new slot -> shard
    moves: dict[tuple[int, int], list[int]]  # (source, target) -> slots

    @property
    def num_moved(self) -> int:
        return sum(len(s) for s in self.moves.values())


def plan_slot_map(owners: list[int], targets: Iterable[int]) -> SlotPlan:
    """New owners giving every target floor/ceil(num_slots / T) slots with the fewest moves.

    The shards that already hold the most slots keep the larger quotas; each shard keeps its
    lowest-numbered slots and gives away the rest; freed slots go to the emptiest shards.
    """
    targets = sorted(set(int(t) for t in targets))
    if not targets:
        raise ValueError("targets: at least one shard must own the slots")
    if any(t < 0 for t in targets):
        raise ValueError(f"targets: shard ids must be >= 0, got {targets}")
    n = len(owners)
    if len(targets) > n:
        raise ValueError(f"targets: {len(targets)} shards but only {n} slots (cluster.num_slots)")
    held: dict[int, list[int]] = {t: [] for t in targets}
    freed: list[int] = []
    for slot, owner in enumerate(owners):
        (held[owner] if owner in held else freed).append(slot)
    base, extra = divmod(n, len(targets))
    by_size = sorted(targets, key=lambda t: (-len(held[t]), t))
    quota = {t: base + (1 if i < extra else 0) for i, t in enumerate(by_size)}
    for t in targets:
        freed += held[t][quota[t] :]
        del held[t][quota[t] :]
    freed.sort()
    new = list(owners)
    moves: dict[tuple[int, int], list[int]] = {}
    for t in sorted(targets, key=lambda t: (len(held[t]), t)):
        while len(held[t]) < quota[t]:
            slot = freed.pop(0)
            held[t].append(slot)
            moves.setdefault((owners[slot], t), []).append(slot)
            new[slot] = t
    assert not freed and all(len(held[t]) == quota[t] for t in targets)
    return SlotPlan(owners=new, moves=moves)


def target_shards(
    owners: list[int], *, num_shards: int | None = None, add: Iterable[int] = (), remove: Iterable[int] = ()
) -> list[int]:
    """The shard ids that should own slots: 0..num_shards-1, or the current ones +add -remove."""
    add, remove = set(add), set(remove)
    if num_shards is not None:
        if add or remove:
            raise ValueError("give either num_shards or add/remove, not both")
        if num_shards < 1:
            raise ValueError(f"num_shards: must be >= 1, got {num_shards}")
        return list(range(num_shards))
    both = add & remove
    if both:
        raise ValueError(f"shards {sorted(both)} are both added and removed")
    targets = (set(owners) | add) - remove
    if not targets:
        raise ValueError("removing every shard would leave no owner for the slots")
    return sorted(targets)


@dataclass(slots=True)
class RebalanceReport:
    old_epoch: int
    new_epoch: int
    owners: list[int]
    moves: dict[tuple[int, int], list[int]]
    bytes_sent: int = 0
    seconds: float = 0.0
    set_on: dict[int, int] = field(default_factory=dict)  # shard -> slots dropped by SetSlotMap


async def rebalance(
    control: Any,
    *,
    num_shards: int | None = None,
    add: Iterable[int] = (),
    remove: Iterable[int] = (),
    client: Any = None,
    timeout_s: float = 600.0,
    security: Any = None,
) -> RebalanceReport:
    """Move slots so that the target shards own them evenly; see the module docstring."""
    from services.client import ShardClient

    t0 = time.monotonic()
    smap = await control.slot_map()
    want = (await control.config()).cluster.replicas if smap.replicas else 1
    short = [s for s in range(len(smap.owners)) if len(smap.holders(s)) < want]
    if short:
        raise ValueError(
            f"slots {short[:8]} ({len(short)} in all) have fewer than cluster.replicas={want} holders: a shard "
            "failed and its slots are not rebuilt yet (docs/failover.md); rebalance once every slot has its copies"
        )
    targets = target_shards(smap.owners, num_shards=num_shards, add=add, remove=remove)
    records = {r.shard_id: r for r in await control.shards()}
    dead = [t for t in targets if t not in records or not records[t].alive]
    if dead:
        raise ValueError(
            f"shards {dead} are not registered and alive: start them first (`python -m services.shard "
            "--shard-id N ...` or LocalCluster.add_shard) and let them register"
        )
    plan = plan_slot_map(smap.owners, targets)
    replicas: list[list[int]] | None = None
    if want > 1:  # the replica sets move too: every new holder gets a copy (replicas.plan_replica_moves)
        moves = plan_replica_moves(smap.owners, smap.replicas, primaries=plan.owners, targets=targets, want=want)
        plan, replicas = SlotPlan(owners=moves.owners, moves=moves.copies), moves.replicas
    own_client = client is None
    if own_client:
        client = await ShardClient.connect(control, security=security)  # SetSlotMap/MigrateSlots: admin
    try:
        await client.refresh()
        addresses = {i: r.address for i, r in records.items()}
        report = RebalanceReport(old_epoch=smap.epoch, new_epoch=smap.epoch, owners=plan.owners, moves=plan.moves)
        try:
            for (source, target), slots in sorted(plan.moves.items()):
                reply = await _between_steps(
                    functools.partial(
                        client.migrate_slots, source, slots, addresses[target], epoch=smap.epoch, timeout_s=timeout_s
                    ),
                    timeout_s=timeout_s,
                )
                report.bytes_sent += reply.bytes_sent
            changed = plan.moves or (replicas is not None and replicas != smap.replicas)
            new = (
                await control.set_slot_map(plan.owners, expected_epoch=smap.epoch, replicas=replicas)
                if changed
                else smap
            )
        except BaseException:
            # the old map stands: re-install it on the sources so their frozen slots take updates again
            await asyncio.gather(
                *(
                    client.set_slot_map_on(src, epoch=smap.epoch, owned_slots=smap.held_by(src), timeout_s=timeout_s)
                    for src in sorted({src for (src, _) in plan.moves})
                ),
                return_exceptions=True,
            )
            raise
        report.new_epoch = new.epoch
        await client.refresh()
        gainers = sorted({t for (_, t) in plan.moves})
        involved = smap.all_holders() | new.all_holders() | {s for s, r in records.items() if r.alive}
        for group in (gainers, sorted(involved - set(gainers))):
            replies = await asyncio.gather(
                *(
                    _between_steps(
                        functools.partial(
                            client.set_slot_map_on, s, epoch=new.epoch, owned_slots=new.held_by(s), timeout_s=timeout_s
                        ),
                        timeout_s=timeout_s,
                    )
                    for s in group
                )
            )
            report.set_on.update({s: r.slots_dropped for s, r in zip(group, replies, strict=True)})
        report.seconds = time.monotonic() - t0
        return report
    finally:
        if own_client:
            await client.close()


async def _between_steps(call: Callable[[], Awaitable[T]], *, timeout_s: float) -> T:
    """`call()`, again while the shard says a training step is collecting parts, or that a copy is
    behind the steps its receiver applied (retry the migration), bounded by `timeout_s`."""
    from services.client import Reason, ShardError, error_reason

    deadline, delay = time.monotonic() + timeout_s, 0.005
    while True:
        try:
            return await call()
        except ShardError as err:
            if error_reason(err) not in (Reason.COLLECTING_PARTS, Reason.MIGRATION_BEHIND):
                raise
            if time.monotonic() + delay > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(2 * delay, 0.1)
