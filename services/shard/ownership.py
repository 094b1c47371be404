"""Which slots a shard serves, and how far each of them is trained: epochs, slot swaps, per-slot steps.

Every (table, slot) a shard holds has its own applied step, `slot_steps[table][slot]`: the last
optimizer step whose updates the slot's rows hold. A shard's slots can differ because slots
arrive from several sources (a repair rebuilding a returning shard from every live replica, a
rebalance moving slots from several shards), each copied, frozen, at the step its source had
reached. An update of step s is a table-wide event: it is applied to the rows of the slots
that are behind s and skipped for the slots that already hold it (copied after s was
applied), and then every owned slot is at s or later. The table's `applied_step` that a shard
reports, gates training lookups with and answers pushes with is the OLDEST step over its
owned slots (every row served is at least that new); with no slot owned it is the last step
the shard applied. Slot steps travel with the rows: in MigrateSlots chunks and checkpoint files.

`SlotOwnership` is a mixin of `ShardStore` (store.py), which owns the tables and the view.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engram.layout import TableLayout, slot_num_rows
from services.shard.errors import Reason, invalid, precondition
from services.shard.limits import Freezes
from services.shard.shm_table import TableMemory
from services.shard.store_types import SlotData, TableData, View


class SlotOwnership:
    # set by ShardStore.__init__
    shard_id: int
    num_slots: int
    max_epoch_jump: int
    layouts: dict[int, TableLayout]
    applied_step: dict[int, int]  # table -> the oldest step over the owned slots (module docstring)
    slot_steps: dict[int, np.ndarray]  # table -> (num_slots,) int64 applied step per slot (owned ones count)
    frozen: Freezes
    memory: TableMemory
    view: View

    def _allocate(self, table: int, owned: tuple[int, ...], epoch: int) -> TableData:
        raise NotImplementedError

    def _check_slots(self, slots: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad:
            raise invalid(f"slots {bad[:8]} are outside 0..{self.num_slots - 1}")
        if len(set(slots)) != len(slots):
            raise invalid(f"slots: duplicates in {sorted(slots)}")
        return tuple(sorted(int(s) for s in slots))

    # ---------------------------------------------------------------------------------------
    # per-slot steps

    def _settle_steps(self, table: int, owned: tuple[int, ...]) -> None:
        """applied_step[table] <- the oldest step over `owned` (unchanged when nothing is owned)."""
        if owned:
            self.applied_step[table] = int(self.slot_steps[table][list(owned)].min())

    def advance_steps(self, table: int, step: int) -> None:
        """Step `step` of `table` is applied: every owned slot is at `step` or later."""
        owned = list(self.view.owned)
        steps = self.slot_steps[table]
        steps[owned] = np.maximum(steps[owned], step)
        self.applied_step[table] = int(steps[owned].min()) if owned else step

    def head_step(self, table: int) -> int:
        """The newest step over the owned slots (the last step applied, with none owned)."""
        owned = list(self.view.owned)
        return int(self.slot_steps[table][owned].max()) if owned else self.applied_step[table]

    def behind(self, table: int, rows: np.ndarray, step: int) -> np.ndarray | None:
        """(U,) owned rows -> (U,) bool: their slot has not applied `step` yet; None when all are behind."""
        owned = list(self.view.owned)
        steps = self.slot_steps[table]
        if not owned or int(steps[owned].max()) < step:
            return None  # the usual case: every slot is behind `step`
        return steps[rows % self.num_slots] < step

    # ---------------------------------------------------------------------------------------
    # slots (checkpoints, migration, ownership changes)

    def rewrite_rows(self, write: Callable[[], None], steps: dict[tuple[int, int], int]) -> None:
        """Run `write()` (it overwrites owned rows in place, e.g. a restore), then refresh the
        mirrors and set the (table, slot) applied steps; shared readers retry while it runs."""
        tables = self.view.tables
        shms = [d.place.shm for d in tables.values() if d.place.shm is not None]
        for shm in shms:
            shm.begin_write()
        try:
            try:
                write()
            finally:  # the mirror follows the weights, whatever the write left in them
                for d in tables.values():
                    d.place.refresh_mirror()
            for (t, s), step in steps.items():
                self.slot_steps[t][s] = step
            for t in {t for t, _ in steps}:
                self._settle_steps(t, self.view.owned)
        finally:
            for t, d in tables.items():
                if d.place.shm is not None:
                    d.place.shm.end_write(self.applied_step[t])

    def slot_block(self, table: int, slot: int, view: View | None = None) -> SlotData:
        """Views (not copies) of one owned slot's rows and state."""
        view = view or self.view
        if slot not in view.owned:
            raise precondition(
                f"slot {slot} is not owned by shard {self.shard_id} at epoch {view.epoch}", Reason.SLOT_NOT_OWNED
            )
        return self._block(table, view.tables[table], slot)

    def _block(self, table: int, data: TableData, slot: int) -> SlotData:
        a = int(data.base[slot])
        n = slot_num_rows(self.layouts[table].num_rows, slot, self.num_slots)
        return SlotData(
            weights=data.weights[a : a + n],
            state=tuple(s[a : a + n] for s in data.state),
            applied_step=int(self.slot_steps[table][slot]),
        )

    def bump_epoch(self, *, epoch: int, owners: list[int] | None) -> None:
        """The same slots under a newer map (a failover or repair elsewhere): only the epoch moves.

        Rows, tables and pending step parts stay as they are, so this needs no table lock and is not
        held up by a step collecting parts. Frozen slots thaw, as with any new map."""
        view = self.view
        if epoch <= view.epoch:
            raise precondition(
                f"stale slot-map epoch {epoch} (shard is at {view.epoch}): refresh the slot map", Reason.EPOCH_STALE
            )
        if epoch > view.epoch + self.max_epoch_jump:
            raise invalid(
                f"epoch {epoch} is more than cluster.max_epoch_jump={self.max_epoch_jump} ahead of this shard's "
                f"epoch {view.epoch}; send the control plane's current slot map"
            )
        if owners is not None and (
            len(owners) != self.num_slots
            or any(not 0 <= o < self.num_slots for o in owners)
            or {s for s, o in enumerate(owners) if o == self.shard_id} != set(view.owned)
        ):
            raise invalid(f"owners: not a map of {self.num_slots} slots giving this shard its slots {view.owned[:8]}")
        for data in view.tables.values():
            if data.place.shm is not None:
                data.place.shm.set_epoch(epoch)
        self.view = View(
            epoch=epoch, owned=view.owned, owners=tuple(owners) if owners else view.owners, tables=view.tables
        )
        self.frozen.clear()

    def set_ownership(
        self,
        *,
        epoch: int,
        owned_slots: list[int],
        owners: list[int] | None,
        staged: dict[tuple[int, int], SlotData],
    ) -> int:
        """Install the slots served from `epoch` on -> number of slots dropped.

        Kept slots are copied from the live tables, new ones from `staged` (every table must be
        staged); the new view is swapped in at once. The caller holds every table's lock.
        """
        view = self.view
        owned = self._check_slots(owned_slots)
        if epoch < view.epoch:
            raise precondition(
                f"stale slot-map epoch {epoch} (shard is at {view.epoch}): refresh the slot map", Reason.EPOCH_STALE
            )
        if epoch == view.epoch:
            if owned == view.owned:  # the map stands: no migration out of here is pending, so thaw
                self.frozen.clear()
                return 0
            raise precondition(
                f"epoch {epoch} is already installed with other slots; a new map needs a new epoch",
                Reason.SLOT_MAP_REFUSED,
            )
        if epoch > view.epoch + self.max_epoch_jump:
            raise invalid(
                f"epoch {epoch} is more than cluster.max_epoch_jump={self.max_epoch_jump} ahead of this shard's "
                f"epoch {view.epoch}; send the control plane's current slot map"
            )
        if owners is not None:
            if len(owners) != self.num_slots:
                raise invalid(f"owners: {len(owners)} entries, the cluster has {self.num_slots} slots")
            bad = sorted({o for o in owners if not 0 <= o < self.num_slots})
            if bad:
                raise invalid(f"owners: shard ids {bad[:8]} are outside 0..{self.num_slots - 1}")
            mismatch = sorted(set(owned) ^ {s for s, o in enumerate(owners) if o == self.shard_id})
            if mismatch:
                raise invalid(f"owned_slots and owners disagree about slots {mismatch[:8]}")
        missing = [(t, s) for s in owned if s not in view.owned for t in self.layouts if (t, s) not in staged]
        if missing:
            t, s = missing[0]
            raise precondition(
                f"slot {s}: shard {self.shard_id} has no data for it (table {t} not imported); "
                "migrate it here (MigrateSlots) before handing it over",
                Reason.SLOT_MAP_REFUSED,
            )
        dropped = sorted(set(view.owned) - set(owned))
        if dropped and owners is None:
            raise precondition(
                f"the slot map would drop slots {dropped[:8]} ({len(dropped)} in all) without naming their new "
                "owners: send `owners` (the full slot map) or write the map to the control plane first; refused, "
                "so no slot is left without a shard",
                Reason.SLOT_MAP_REFUSED,
            )
        self.frozen.active()  # lift leases that ran out
        stale = [s for s in dropped if s in self.frozen.expired]
        if stale:
            raise precondition(
                f"the migration of slot {stale[0]} to {self.frozen.expired[stale[0]]} expired "
                "(cluster.freeze_lease_s) before this slot map came, and updates may have reached the slot since: "
                "migrate it again, then send the slot map",
                Reason.SLOT_MAP_REFUSED,
            )
        tables = {}
        for t in self.layouts:
            new = self._allocate(t, owned, epoch)
            for s in owned:
                src = self.slot_block(t, s, view) if s in view.owned else staged[(t, s)]
                dst = self._block(t, new, s)
                dst.weights.copy_(src.weights)
                for d, x in zip(dst.state, src.state, strict=True):
                    d.copy_(x)
            tables[t] = new
            new.place.refresh_mirror()
        for t, new in tables.items():
            for s in owned:
                if s not in view.owned:  # each imported slot keeps the step of the copy it came from
                    self.slot_steps[t][s] = staged[(t, s)].applied_step
            self._settle_steps(t, owned)
            if new.place.shm is not None:
                new.place.shm.set_applied(self.applied_step[t])
        self.view = View(epoch=epoch, owned=owned, owners=tuple(owners) if owners else None, tables=tables)
        self.memory.publish({t: d.place for t, d in tables.items()})
        self.frozen.clear()
        return len(set(view.owned) - set(owned))
