"""Failure detection, failover and repair of replicated slots (cluster.replicas > 1; docs/failover.md).

Every shard runs a `FailoverLoop`. Each `cluster.failover_check_s` it takes or keeps the
leader lease (`{ns}:failover:leader`, TTL `cluster.heartbeat_ttl_s`); only the leader acts,
and every change of the slot map is a compare-and-set on its epoch, so a stale leader (one
that was stopped mid-tick) cannot overwrite a newer map. One tick:

  1. detect    a holder of slots whose liveness key is gone (killed, stopped, hung, cut off:
               no heartbeat for heartbeat_ttl_s)
  2. fence     drop it from every holder list with an epoch bump; the first live holder left
     promote   is each slot's new primary. A fenced shard that comes back is at the old epoch:
               every client and shard at the new one refuses it (stale epoch)
  3. install   SetSlotMap(epoch, held slots) on every live shard behind the map's epoch; a
               shard that is in no holder list but still serves slots (a stopped shard that
               resumed) drops them
  4. repair    an empty live shard receives copies of every slot that has fewer than
               `replicas` holders, from every live holder that has them (one MigrateSlots
               freeze per source), then becomes their replica in ONE map change (epoch bump,
               SetSlotMap on the target first). A returning shard is so rebuilt from every live
               replica, whichever shards hold them (3 shards, R=2: both survivors). Slots from
               different sources may be copied at different steps; shards keep one applied step
               per slot (services/shard/ownership.py). The target holds nothing before the map
               lists it, so no client counted it as having applied a step one of its copies
               lacks. The sources stay frozen until the map is installed: a round that takes
               over half of `cluster.freeze_lease_s` is abandoned (thawed) and tried again.

`rejoin()` runs when a shard boots: a restarted shard that other live holders cover gives up
its place in those slots first (epoch bump) and boots empty, so it never serves rows older
than its replicas'; the leader then rebuilds it from them (step 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

from engram.config import Config
from services.control.rebalance import _between_steps
from services.control.replicas import drop_shards, plan_repair
from services.control.store import ControlPlane, ControlPlaneUnavailable, SlotMap

log = logging.getLogger("engram.failover")


async def rejoin(control: ControlPlane, shard_id: int, *, attempts: int = 20) -> SlotMap:
    """At boot: leave the slots other live holders cover if this shard was registered before -> the map."""
    for _ in range(attempts):
        smap = await control.slot_map()
        records = await control.shards()
        if not smap.replicas or shard_id not in {r.shard_id for r in records}:
            return smap  # no replicas, or a first boot: nothing newer exists elsewhere
        others = {r.shard_id for r in records if r.alive and r.shard_id != shard_id}
        covered = [s for s in smap.held_by(shard_id) if any(h in others for h in smap.holders(s) if h != shard_id)]
        if not covered:
            return smap
        owners, replicas = list(smap.owners), [list(r) for r in smap.replicas]
        for s in covered:
            hs = [h for h in smap.holders(s) if h != shard_id]
            owners[s], replicas[s] = hs[0], hs[1:]
        try:
            new = await control.set_slot_map(owners, expected_epoch=smap.epoch, replicas=replicas)
        except ValueError:  # the map moved meanwhile: look again
            await asyncio.sleep(0.05)
            continue
        log.warning(
            "shard %d restarted: left %d slots to their live replicas (epoch %d); it is rebuilt from them",
            shard_id,
            len(covered),
            new.epoch,
        )
        await _event(control, "rejoin", shard=shard_id, slots=len(covered), epoch=new.epoch)
        return new
    raise RuntimeError(f"shard {shard_id}: the slot map kept changing while the shard rejoined")


async def _event(control: ControlPlane, kind: str, **fields: Any) -> None:
    try:
        await control.add_event({"kind": kind, "t": time.time(), **fields})
    except ControlPlaneUnavailable:
        pass


class FailoverLoop:
    def __init__(self, control: ControlPlane, cfg: Config, *, shard_id: int) -> None:
        self.control, self.cfg, self.shard_id = control, cfg, shard_id
        self._client: Any = None
        self._installed: dict[int, tuple[int, str]] = {}  # shard -> (epoch, address) last installed by us
        self._errors = 0

    async def run(self) -> None:
        c = self.cfg.cluster
        try:
            while True:
                await asyncio.sleep(c.failover_check_s)
                try:
                    if await self.control.lead(self.shard_id, ttl_s=c.heartbeat_ttl_s):
                        await self.tick()
                    self._errors = 0
                except ControlPlaneUnavailable:
                    pass  # the heartbeat already says so
                except Exception as exc:  # keep failing over; say why once per run of errors
                    if not self._errors:
                        log.warning("failover tick failed (retrying every %.2f s): %r", c.failover_check_s, exc)
                    self._errors += 1
        finally:
            if self._client is not None:
                await self._client.close()

    async def client(self) -> Any:
        from services.client import ShardClient

        if self._client is None:
            # this shard's own identity (admin, SetSlotMap): connect() never takes the stored layout's
            self._client = await ShardClient.connect(self.control, timeout_s=5.0, security=self.cfg.security)
        await self._client.refresh()
        return self._client

    async def tick(self) -> None:
        smap = await self.control.slot_map()
        records = {r.shard_id: r for r in await self.control.shards()}
        alive = {i for i, r in records.items() if r.alive}
        holders = smap.all_holders()
        dead = {h for h in holders if h in records and h not in alive}  # never registered: not started yet
        if dead and holders & alive:
            plan = drop_shards(smap.owners, smap.replicas, dead)
            t0 = time.time()
            new = await self.control.set_slot_map(plan.owners, expected_epoch=smap.epoch, replicas=plan.replicas)
            log.warning(
                "failover: shards %s stopped heartbeating; fenced at epoch %d, %d slots promoted to a replica%s",
                sorted(dead),
                new.epoch,
                len(plan.promoted),
                f", {len(plan.lost)} slots have no live holder" if plan.lost else "",
            )
            await _event(
                self.control,
                "failover",
                dead=sorted(dead),
                epoch=new.epoch,
                promoted=len(plan.promoted),
                lost=len(plan.lost),
                t=t0,
            )
            smap = new
        await self._install(smap, records, alive)
        if self.cfg.cluster.replicas > 1:
            await self._repair(smap, records, alive)

    async def _install(self, smap: SlotMap, records: dict, alive: set[int]) -> None:
        todo = []
        for s in sorted(alive):
            info, held = records[s].info or {}, smap.held_by(s)
            if info.get("epoch") == smap.epoch and info.get("slots") == len(held):
                continue
            if self._installed.get(s) == (smap.epoch, records[s].address):
                continue  # installed; its next heartbeat will say so
            if s not in smap.all_holders() and not info.get("slots") and info.get("epoch", 0) >= smap.epoch:
                continue
            todo.append((s, held))
        if not todo:
            return
        client = await self.client()
        results = await asyncio.gather(
            *(client.set_slot_map_on(s, epoch=smap.epoch, owned_slots=held, timeout_s=2.0) for s, held in todo),
            return_exceptions=True,
        )
        for (s, held), res in zip(todo, results, strict=True):
            if isinstance(res, BaseException):
                log.info("SetSlotMap(epoch %d) on shard %d not installed yet: %s", smap.epoch, s, res)
                continue
            self._installed[s] = (smap.epoch, records[s].address)
            if not held and res.slots_dropped:
                log.warning("fenced shard %d dropped its %d stale slots (epoch %d)", s, res.slots_dropped, smap.epoch)
                await _event(self.control, "fenced", shard=s, slots=res.slots_dropped, epoch=smap.epoch)

    async def _repair(self, smap: SlotMap, records: dict, alive: set[int]) -> None:
        """One round: copies of every under-replicated slot into one empty live shard, one map change."""
        want = self.cfg.cluster.replicas
        empty = [
            s
            for s in sorted(alive - smap.all_holders())
            if not (records[s].info or {}).get("slots") and (records[s].info or {}).get("epoch") == smap.epoch
        ]
        plan = next((p for t in empty if (p := plan_repair(smap.owners, smap.replicas, want=want, target=t))), None)
        if plan is None:
            return
        client = await self.client()
        t0, start = time.time(), time.monotonic()
        timeout, lease = self.cfg.cluster.migrate_timeout_s, self.cfg.cluster.freeze_lease_s
        sent = 0
        try:
            for source, slots in sorted(plan.sources.items()):
                reply = await _between_steps(
                    functools.partial(
                        client.migrate_slots,
                        source,
                        slots,
                        records[plan.target].address,
                        epoch=smap.epoch,
                        timeout_s=timeout,
                    ),
                    timeout_s=timeout,
                )
                sent += reply.bytes_sent
            if time.monotonic() - start > lease / 2:  # the first source's freeze may lift before the map
                raise TimeoutError(
                    f"repair copies took {time.monotonic() - start:.1f} s, over half of cluster.freeze_lease_s="
                    f"{lease:g}; abandoned (sources thawed), tried again"
                )
            new = await self.control.set_slot_map(plan.owners, expected_epoch=smap.epoch, replicas=plan.replicas)
        except BaseException:
            with contextlib.suppress(Exception):  # the old map stands: thaw the sources' frozen slots
                await asyncio.gather(
                    *(
                        client.set_slot_map_on(src, epoch=smap.epoch, owned_slots=smap.held_by(src), timeout_s=5.0)
                        for src in plan.sources
                    ),
                    return_exceptions=True,
                )
            raise
        await client.refresh()

        async def install(s: int) -> Any:
            return await _between_steps(
                lambda: client.set_slot_map_on(s, epoch=new.epoch, owned_slots=new.held_by(s), timeout_s=10.0),
                timeout_s=timeout,
            )

        for s in [plan.target, *sorted((alive & new.all_holders()) - {plan.target})]:  # the target swaps in first
            await install(s)
            self._installed[s] = (new.epoch, records[s].address)
        log.warning(
            "repair: shard %d now holds %d slots copied from shards %s (%d bytes, %.2f s, epoch %d)",
            plan.target,
            len(plan.slots),
            sorted(plan.sources),
            sent,
            time.time() - t0,
            new.epoch,
        )
        await _event(
            self.control,
            "repaired",
            target=plan.target,
            sources=sorted(plan.sources),
            slots=len(plan.slots),
            epoch=new.epoch,
            t=time.time(),
            started=t0,
        )
