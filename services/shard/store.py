"""The rows of one shard: per table, the owned slots' rows in one contiguous fp32 tensor.

Layout of a table on a shard (R = rows of the owned slots, D = dims per row):

    weights  (R, D) fp32            slot blocks in ascending slot order
    state    adam: m, v (R, D) fp32 ; adagrad: acc (R,) fp32
    base     (num_slots,) int64     position of each owned slot's first row, -1 if not owned

    position(row) = base[row % num_slots] + row // num_slots        (vectorised)

Everything a request carries is validated against one `View` (epoch, owned slots, tables)
before any state is touched; errors are `ShardError`s with the gRPC code to return. The
methods here are synchronous and meant to run in a worker thread (torch's index_select /
index_copy_ release the GIL); the caller serialises updates per table (see engine.py).
Lookups take no lock: a lookup racing an update of the same rows may see a row before or
after (or, for the few rows being copied at that instant, partly after) the update -- the
usual parameter-server read semantics; sync-mode readers look up after the step's apply.
Weights (and the optional bf16/fp16 mirror, refreshed with every write) live where
`TableMemory` puts them: in files under cluster.shm_dir that co-located clients read, with a
seqlock around every write (shm_table.py), or in private memory.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from engram.config import Config
from engram.init import init_rows
from engram.layout import TableLayout, slot_num_rows, table_layouts
from engram.row_optim import AdagradParams, AdamParams, lazy_adam_, rowwise_adagrad_
from services.shard import row_store_format as fmts
from services.shard.errors import Code, ShardError, invalid, precondition, unavailable
from services.shard.gather import LookupResult, encode_lookup
from services.shard.limits import Freezes
from services.shard.memory import alloc_state, alloc_table
from services.shard.shm_table import Placement, TableMemory
from services.wire import TORCH_DTYPES, row_bytes

OPTIMIZERS = ("adam", "adagrad")
_INIT_CHUNK_ELEMS = 1 << 20  # elements per init_rows call (its float64 temporaries stay ~8 MB each)


@dataclass(slots=True)
class TableData:
    base: np.ndarray  # (num_slots,) int64, -1 = slot not owned
    weights: torch.Tensor  # (R, D) fp32, or (R, storage cols) in engram.row_format (row_store_format.py)
    state: tuple[torch.Tensor, ...]  # adam: m, v (R, D); adagrad: acc (R,); () for read-only (fp8) tables
    place: Placement  # where weights live, the mirror (R, D) bf16/fp16 if kept, the shared file if any


@dataclass(frozen=True, slots=True)
class LookupPlan:
    """A validated lookup: gather src[pos] (src: the mirror when it has the wire dtype, else weights)."""

    src: torch.Tensor  # (R, D), or (R, D + D/32) uint8 for fp8 storage
    pos: np.ndarray  # (n,) int64
    dtype: int
    epoch: int
    applied_step: int
    dim: int = 0  # values per row D


@dataclass(slots=True)
class SlotData:
    """One (table, slot) block: views into a table, or a staged copy received from a peer."""

    weights: torch.Tensor  # (n, D) fp32, or (n, storage cols) in the table's storage format
    state: tuple[torch.Tensor, ...]  # adam: m, v (n, D); adagrad: acc (n,); () for read-only tables
    applied_step: int


@dataclass(frozen=True, slots=True)
class View:
    """What a request is validated and served against; replaced whole, never mutated."""

    epoch: int
    owned: tuple[int, ...]  # sorted slots served at this epoch
    owners: tuple[int, ...] | None  # the full slot map (slot -> shard) when known, for messages
    tables: dict[int, TableData]


@dataclass(slots=True)
class Update:
    """A validated gradient for one table (rows unique and owned, grads finite)."""

    table: int
    rows: np.ndarray  # (U,) int64
    grads: torch.Tensor  # (U, D) fp32
    step: int
    params: AdamParams | AdagradParams


def optimizer_params(kind: str, *, lr: float, beta1: float, beta2: float, eps: float) -> AdamParams | AdagradParams:
    if not (np.isfinite(lr) and lr > 0):
        raise invalid(f"optimizer.lr: must be a positive number, got {lr}")
    if not (np.isfinite(eps) and eps > 0):
        raise invalid(f"optimizer.eps: must be a positive number, got {eps}")
    if kind == "adagrad":
        return AdagradParams(lr=lr, eps=eps)
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise invalid(f"optimizer.{name}: must be in [0, 1), got {beta}")
    return AdamParams(lr=lr, beta1=beta1, beta2=beta2, eps=eps)


class ShardStore:
    def __init__(
        self,
        cfg: Config,
        *,
        shard_id: int,
        owned_slots: list[int],
        epoch: int,
        owners: list[int] | None = None,
        init_threads: int = 2,
        init_weights: bool = True,
        memory: TableMemory | None = None,
    ) -> None:
        """init_weights=False leaves the rows unset: only for a store that is restored next."""
        self.memory = memory or TableMemory(mirror=cfg.cluster.row_mirror)
        self.shard_id = shard_id
        self.num_slots = cfg.cluster.num_slots
        self.kind = cfg.cluster.optimizer
        self.row_format = cfg.engram.row_format  # storage format of every table (row_store_format.py)
        self.max_message_bytes = cfg.cluster.max_message_mb << 20
        self.max_step_jump = cfg.cluster.max_step_jump
        self.max_epoch_jump = cfg.cluster.max_epoch_jump
        self.seed = cfg.engram.seed
        self.init_std = cfg.engram.init_std
        self.layouts: dict[int, TableLayout] = table_layouts(cfg.engram)
        self.applied_step: dict[int, int] = dict.fromkeys(self.layouts, 0)
        self.frozen = Freezes()  # slots being migrated away: updates refused until SetSlotMap or the lease ends
        owned = self._check_slots(owned_slots)
        tables = {t: self._allocate(t, owned, epoch) for t in self.layouts}
        if init_weights:
            self._init_weights(tables, owned, init_threads)
        for data in tables.values():
            data.place.refresh_mirror()
        self.memory.publish({t: d.place for t, d in tables.items()})
        self.view = View(epoch=epoch, owned=owned, owners=tuple(owners) if owners else None, tables=tables)

    @classmethod
    def from_slot_map(cls, cfg: Config, *, shard_id: int, owners: list[int], epoch: int, **kw) -> ShardStore:
        owned = [slot for slot, owner in enumerate(owners) if owner == shard_id]
        return cls(cfg, shard_id=shard_id, owned_slots=owned, epoch=epoch, owners=owners, **kw)

    # ---------------------------------------------------------------------------------------
    # construction

    def _check_slots(self, slots: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad:
            raise invalid(f"slots {bad[:8]} are outside 0..{self.num_slots - 1}")
        if len(set(slots)) != len(slots):
            raise invalid(f"slots: duplicates in {sorted(slots)}")
        return tuple(sorted(int(s) for s in slots))

    def _allocate(self, table: int, owned: tuple[int, ...], epoch: int) -> TableData:
        layout = self.layouts[table]
        sizes = [slot_num_rows(layout.num_rows, s, self.num_slots) for s in owned]
        base = np.full(self.num_slots, -1, dtype=np.int64)
        base[list(owned)] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if owned else []
        rows = int(sum(sizes))
        if self.row_format != "fp32":  # private memory, no mirror, no state if read-only (row_store_format.py)
            place = Placement(weights=fmts.alloc_rows(self.row_format, rows, layout.dim), mirror=None)
            state = () if fmts.read_only(self.row_format) else alloc_state(self.kind, rows, layout.dim)
            return TableData(base=base, weights=place.weights, state=state, place=place)
        place = self.memory.allocate(
            table=table, rows=rows, dim=layout.dim, base=base, epoch=epoch, alloc_private=alloc_table
        )
        return TableData(base=base, weights=place.weights, state=alloc_state(self.kind, rows, layout.dim), place=place)

    def _init_weights(self, tables: dict[int, TableData], owned: tuple[int, ...], threads: int) -> None:
        """init_rows for every owned row, in chunks, on a few threads (numpy releases the GIL)."""
        jobs = []
        for t in tables:
            layout = self.layouts[t]
            chunk = max(1, _INIT_CHUNK_ELEMS // layout.dim)
            for slot in owned:
                n = slot_num_rows(layout.num_rows, slot, self.num_slots)
                jobs += [(t, slot, a, min(n, a + chunk)) for a in range(0, n, chunk)]

        def run(job: tuple[int, int, int, int]) -> None:
            t, slot, a, b = job
            data, layout = tables[t], self.layouts[t]
            rows = slot + self.num_slots * np.arange(a, b, dtype=np.int64)  # global ids, in-slot order
            block = init_rows(seed=self.seed, layer_id=t, rows=rows, dim=layout.dim, std=self.init_std)
            p = int(data.base[slot]) + a
            data.weights[p : p + (b - a)] = fmts.encode_init(self.row_format, block)

        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="init") as pool:
            list(pool.map(run, jobs))

    # ---------------------------------------------------------------------------------------
    # validation

    def check_epoch(self, view: View, epoch: int) -> None:
        if epoch < view.epoch:
            raise precondition(f"stale slot-map epoch {epoch} (shard is at {view.epoch}): refresh the slot map")
        if epoch > view.epoch:
            raise unavailable(f"shard at epoch {view.epoch} has not seen epoch {epoch} yet; retry")

    def table(self, view: View, table: int) -> tuple[TableLayout, TableData]:
        if table not in view.tables:
            raise invalid(f"table {table}: no such Engram table (tables are layers {sorted(self.layouts)})")
        return self.layouts[table], view.tables[table]

    @staticmethod
    def decode_ids(data: bytes, *, field: str = "row_ids") -> np.ndarray:
        if len(data) % 8:
            raise invalid(f"{field}: {len(data)} bytes is not a whole number of int64 ids")
        return np.frombuffer(data, dtype="<i8")

    def _owner_text(self, view: View, slot: int) -> str:
        if view.owners is not None and slot < len(view.owners):
            return f"shard {view.owners[slot]}"
        return f"another shard (not shard {self.shard_id})"

    def positions(self, view: View, table: int, ids: np.ndarray, *, for_update: bool = False) -> np.ndarray:
        """(n,) global rows -> (n,) int64 positions in the table's tensors, all checks done."""
        layout, data = self.table(view, table)
        if ids.size == 0:
            return np.empty(0, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= layout.num_rows:
            bad = np.flatnonzero((ids < 0) | (ids >= layout.num_rows))
            raise ShardError(
                Code.OUT_OF_RANGE,
                f"row_ids: {bad.size} of {ids.size} ids are outside table {table}'s rows 0..{layout.num_rows - 1}"
                f" (first: {int(ids[bad[0]])} at index {int(bad[0])})",
            )
        mask = self.num_slots - 1
        pow2 = not self.num_slots & mask  # a mask and a shift instead of two int64 divisions
        slots = ids & mask if pow2 else ids % self.num_slots
        base = data.base[slots]  # (n,) a fresh array
        if data.base.min() < 0 and base.min() < 0:  # (S,) first: a shard owning every slot skips the (n,) pass
            i = int(np.flatnonzero(base < 0)[0])
            slot = int(slots[i])
            raise precondition(
                f"row {int(ids[i])} is in slot {slot} owned by {self._owner_text(view, slot)} at epoch "
                f"{view.epoch} (this is shard {self.shard_id}); refresh the slot map"
            )
        frozen = self.frozen.active() if for_update else {}
        if frozen:
            moving = np.isin(slots, np.fromiter(frozen, dtype=np.int64))
            if moving.any():
                slot = int(slots[np.flatnonzero(moving)[0]])
                raise unavailable(
                    f"slot {slot} is being migrated to {frozen[slot]}: updates to it wait for the new "
                    f"slot map (epoch > {view.epoch}); retry"
                )
        base += (ids >> (mask.bit_length())) if pow2 else ids // self.num_slots
        return base

    # ---------------------------------------------------------------------------------------
    # lookups

    def check_reply_size(self, table: int, ids_bytes: int, dtype: int) -> None:
        """Refuse a lookup whose reply would exceed a message, from the request alone (nothing built yet)."""
        if table not in self.layouts or not row_bytes(dtype, 1):
            return  # the lookup itself names what is wrong
        reply = ids_bytes // 8 * row_bytes(dtype, self.layouts[table].dim) + 64
        if reply > self.max_message_bytes:
            raise ShardError(
                Code.RESOURCE_EXHAUSTED,
                f"row_ids: {ids_bytes // 8} rows of table {table} make a {reply / 2**20:.1f} MiB reply, over "
                f"cluster.max_message_mb={self.max_message_bytes >> 20}; split the lookup (or use LookupStream)",
            )

    def lookup(
        self, *, table: int, epoch: int, row_ids: bytes, dtype: int, step: int = 0, max_staleness: int = 0
    ) -> LookupResult:
        """-> the serialized LookupResponse: rows [n, D] in `dtype`, in request order."""
        plan = self.plan_lookup(
            table=table, epoch=epoch, ids=self.decode_ids(row_ids), dtype=dtype, step=step, max_staleness=max_staleness
        )
        return encode_lookup(
            plan.src, plan.pos, dtype=dtype, epoch=plan.epoch, applied_step=plan.applied_step, dim=plan.dim
        )

    def plan_lookup(
        self, *, table: int, epoch: int, ids: np.ndarray, dtype: int, step: int = 0, max_staleness: int = 0
    ) -> LookupPlan:
        """Validate a lookup of (n,) ids completely -> what to gather (nothing is touched).

        applied_step is read before the gather, so the rows are at least that new. With `step`
        (training), rows missing more than `max_staleness` steps of updates are refused.
        """
        view = self.view
        self.check_epoch(view, epoch)
        layout, data = self.table(view, table)
        fmts.check_lookup_dtype(self.row_format, dtype, dim=layout.dim, table=table)
        self.check_reply_size(table, len(ids) * 8, dtype)
        pos = self.positions(view, table, ids)
        applied = self.applied_step[table]
        if step and step - 1 - applied > max_staleness:
            raise unavailable(
                f"rows of table {table} for step {step} would miss {step - 1 - applied} steps of updates "
                f"(applied step {applied}, staleness bound {max_staleness}); retry once step "
                f"{step - 1 - max_staleness} is applied"
            )
        mirror = data.place.mirror
        src = mirror if mirror is not None and mirror.dtype == TORCH_DTYPES.get(dtype) else data.weights
        return LookupPlan(src=src, pos=pos, dtype=dtype, epoch=view.epoch, applied_step=applied, dim=layout.dim)

    # ---------------------------------------------------------------------------------------
    # updates

    def prepare_update(
        self,
        *,
        table: int,
        epoch: int,
        row_ids: bytes,
        grads: bytes,
        step: int,
        kind: str,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
    ) -> Update:
        """Validate a gradient completely; the caller holds the table's update lock."""
        view = self.view
        self.check_epoch(view, epoch)
        layout, _ = self.table(view, table)
        fmts.refuse_write(self.row_format, table, "ApplyGradients")
        kind = kind or self.kind
        if kind not in OPTIMIZERS:
            raise invalid(f"optimizer.kind: unknown {kind!r} (adam or adagrad)")
        if kind != self.kind:
            raise precondition(f"optimizer.kind: this shard keeps {self.kind} state; cannot apply {kind}")
        params = optimizer_params(kind, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        if step < 1:
            raise invalid(f"step: must be >= 1 (1-based optimizer step), got {step}")
        if step <= self.applied_step[table]:
            raise precondition(
                f"step {step} for table {table} is from the past: step {self.applied_step[table]} is already applied"
            )
        if step > self.applied_step[table] + self.max_step_jump:
            raise precondition(
                f"step {step} for table {table} is too far ahead: the shard has applied step "
                f"{self.applied_step[table]} and takes at most step {self.applied_step[table] + self.max_step_jump} "
                f"next (cluster.max_step_jump={self.max_step_jump}); restore a checkpoint or resume from the "
                "shard's applied step"
            )
        ids = self.decode_ids(row_ids)
        n, dim = ids.size, layout.dim
        if len(grads) != n * dim * 4:
            raise invalid(
                f"grads: {len(grads)} bytes, expected {n * dim * 4} for {n} rows x {dim} dims of fp32 (table {table})"
            )
        uniq, counts = np.unique(ids, return_counts=True)
        if uniq.size != n:
            i = int(np.argmax(counts))
            raise invalid(
                f"row_ids: row {int(uniq[i])} appears {int(counts[i])} times in the gradient of table {table}; "
                f"{n - uniq.size} duplicates in all (send each row once with its summed gradient)"
            )
        self.positions(view, table, ids, for_update=True)
        g = torch.frombuffer(grads, dtype=torch.float32).view(n, dim) if n else torch.empty((0, dim))
        finite = torch.isfinite(g)
        if not bool(finite.all()):
            bad_rows = torch.nonzero(~finite.all(dim=1)).flatten()
            raise invalid(
                f"grads: {int((~finite).sum())} non-finite values (NaN/Inf) in {bad_rows.numel()} rows of table "
                f"{table} (first: row {int(ids[int(bad_rows[0])])})"
            )
        return Update(table=table, rows=ids, grads=g, step=step, params=params)

    def apply_update(self, upd: Update) -> int:
        """Apply a validated update (the caller holds the table's update lock) -> rows updated."""
        data = self.view.tables[upd.table]
        idx = torch.from_numpy(self.positions(self.view, upd.table, upd.rows, for_update=True))
        w = data.weights.index_select(0, idx).float()  # (U, D) fp32 (bf16/fp16 storage: computed in fp32)
        if isinstance(upd.params, AdamParams):
            m, v = (s.index_select(0, idx) for s in data.state)  # (U, D) each
            lazy_adam_(w, m, v, upd.grads, step=upd.step, p=upd.params)
            data.state[0].index_copy_(0, idx, m)
            data.state[1].index_copy_(0, idx, v)
        else:
            acc = data.state[0].index_select(0, idx)  # (U,)
            rowwise_adagrad_(w, acc, upd.grads, p=upd.params)
            data.state[0].index_copy_(0, idx, acc)
        shm = data.place.shm
        if shm is not None:
            shm.begin_write()
        data.weights.index_copy_(0, idx, w.to(data.weights.dtype))
        data.place.refresh_mirror(idx, w)
        self.applied_step[upd.table] = upd.step
        if shm is not None:
            shm.end_write(upd.step)
        return int(upd.rows.size)

    def rewrite_rows(self, write: Callable[[], None], steps: dict[int, int]) -> None:
        """Run `write()` (it overwrites owned rows in place, e.g. a restore), then refresh the
        mirrors and set the tables' applied steps; shared readers retry while it runs."""
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
            self.applied_step.update(steps)
        finally:
            for t, d in tables.items():
                if d.place.shm is not None:
                    d.place.shm.end_write(self.applied_step[t])

    # ---------------------------------------------------------------------------------------
    # slots (checkpoints, migration, ownership changes)

    def slot_block(self, table: int, slot: int, view: View | None = None) -> SlotData:
        """Views (not copies) of one owned slot's rows and state."""
        view = view or self.view
        if slot not in view.owned:
            raise precondition(f"slot {slot} is not owned by shard {self.shard_id} at epoch {view.epoch}")
        return self._block(table, view.tables[table], slot)

    def _block(self, table: int, data: TableData, slot: int) -> SlotData:
        a = int(data.base[slot])
        n = slot_num_rows(self.layouts[table].num_rows, slot, self.num_slots)
        return SlotData(
            weights=data.weights[a : a + n],
            state=tuple(s[a : a + n] for s in data.state),
            applied_step=self.applied_step[table],
        )

    def bump_epoch(self, *, epoch: int, owners: list[int] | None) -> None:
        """The same slots under a newer map (a failover or repair elsewhere): only the epoch moves.

        Rows, tables and pending step parts stay as they are, so this needs no table lock and is not
        held up by a step collecting parts. Frozen slots thaw, as with any new map."""
        view = self.view
        if epoch <= view.epoch:
            raise precondition(f"stale slot-map epoch {epoch} (shard is at {view.epoch}): refresh the slot map")
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
            raise precondition(f"stale slot-map epoch {epoch} (shard is at {view.epoch}): refresh the slot map")
        if epoch == view.epoch:
            if owned == view.owned:  # the map stands: no migration out of here is pending, so thaw
                self.frozen.clear()
                return 0
            raise precondition(f"epoch {epoch} is already installed with other slots; a new map needs a new epoch")
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
                "migrate it here (MigrateSlots) before handing it over"
            )
        dropped = sorted(set(view.owned) - set(owned))
        if dropped and owners is None:
            raise precondition(
                f"the slot map would drop slots {dropped[:8]} ({len(dropped)} in all) without naming their new "
                "owners: send `owners` (the full slot map) or write the map to the control plane first; refused, "
                "so no slot is left without a shard"
            )
        self.frozen.active()  # lift leases that ran out
        stale = [s for s in dropped if s in self.frozen.expired]
        if stale:
            raise precondition(
                f"the migration of slot {stale[0]} to {self.frozen.expired[stale[0]]} expired "
                "(cluster.freeze_lease_s) before this slot map came, and updates may have reached the slot since: "
                "migrate it again, then send the slot map"
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
            steps = [staged[(t, s)].applied_step for s in owned if s not in view.owned]
            self.applied_step[t] = max([self.applied_step[t], *steps])
            if new.place.shm is not None:
                new.place.shm.set_applied(self.applied_step[t])
        self.view = View(epoch=epoch, owned=owned, owners=tuple(owners) if owners else None, tables=tables)
        self.memory.publish({t: d.place for t, d in tables.items()})
        self.frozen.clear()
        return len(set(view.owned) - set(owned))

    # ---------------------------------------------------------------------------------------
    # stats

    def table_stats(self) -> list[dict[str, int]]:
        view = self.view
        return [
            {
                "table": t,
                "num_rows": int(data.weights.shape[0]),
                "dim": self.layouts[t].dim,
                "weight_bytes": data.weights.nbytes,
                "state_bytes": sum(s.nbytes for s in data.state),
                "mirror_bytes": 0 if data.place.mirror is None else data.place.mirror.nbytes,
                "applied_step": self.applied_step[t],
            }
            for t, data in sorted(view.tables.items())
        ]

    def nbytes(self) -> int:
        return sum(d["weight_bytes"] + d["state_bytes"] + d["mirror_bytes"] for d in self.table_stats())
