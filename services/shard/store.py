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
seqlock around every write (shm_table.py), or in private memory. Slot ownership (epochs, slot
swaps) and the applied step of every (table, slot) are in ownership.py; the value types in
store_types.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from engram.config import Config
from engram.init import init_rows
from engram.layout import TableLayout, slot_num_rows, table_layouts
from engram.row_optim import AdamParams, lazy_adam_, rowwise_adagrad_
from services.shard import row_store_format as fmts
from services.shard.errors import Code, Reason, ShardError, invalid, precondition, unavailable
from services.shard.gather import LookupResult, encode_lookup
from services.shard.limits import Freezes
from services.shard.memory import alloc_state, alloc_table
from services.shard.ownership import SlotOwnership
from services.shard.shm_table import Placement, TableMemory
from services.shard.store_types import (  # noqa: F401 - re-exported: the store's types, as before the split
    OPTIMIZERS,
    LookupPlan,
    SlotData,
    TableData,
    Update,
    View,
    optimizer_params,
)
from services.wire import ROW_DTYPES, TORCH_DTYPES, row_bytes

_INIT_CHUNK_ELEMS = 1 << 20  # elements per init_rows call (its float64 temporaries stay ~8 MB each)


class ShardStore(SlotOwnership):
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
        self.applied_step: dict[int, int] = dict.fromkeys(self.layouts, 0)  # the oldest over owned slots
        self.slot_steps = {t: np.zeros(self.num_slots, dtype=np.int64) for t in self.layouts}  # ownership.py
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
            raise precondition(
                f"stale slot-map epoch {epoch} (shard is at {view.epoch}): refresh the slot map", Reason.EPOCH_STALE
            )
        if epoch > view.epoch:
            raise unavailable(f"shard at epoch {view.epoch} has not seen epoch {epoch} yet; retry", Reason.EPOCH_AHEAD)

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
        if (
            int(ids.astype(np.int64, copy=False).view(np.uint64).max()) >= layout.num_rows
        ):  # one pass: a negative id is >= 2**63 as uint64
            bad = np.flatnonzero((ids < 0) | (ids >= layout.num_rows))
            raise ShardError(
                Code.OUT_OF_RANGE,
                f"row_ids: {bad.size} of {ids.size} ids are outside table {table}'s rows 0..{layout.num_rows - 1}"
                f" (first: {int(ids[bad[0]])} at index {int(bad[0])})",
                reason=Reason.ROW_OUT_OF_RANGE,
            )
        mask = self.num_slots - 1
        pow2 = not self.num_slots & mask  # a mask and a shift instead of two int64 divisions
        slots = ids & mask if pow2 else ids % self.num_slots
        base = data.base[slots]  # (n,) a fresh array
        if not data.all_owned and base.min() < 0:  # a shard owning every slot skips the (n,) pass
            i = int(np.flatnonzero(base < 0)[0])
            slot = int(slots[i])
            raise precondition(
                f"row {int(ids[i])} is in slot {slot} owned by {self._owner_text(view, slot)} at epoch "
                f"{view.epoch} (this is shard {self.shard_id}); refresh the slot map",
                Reason.SLOT_NOT_OWNED,
            )
        frozen = self.frozen.active() if for_update else {}
        if frozen:
            moving = np.isin(slots, np.fromiter(frozen, dtype=np.int64))
            if moving.any():
                slot = int(slots[np.flatnonzero(moving)[0]])
                raise unavailable(
                    f"slot {slot} is being migrated to {frozen[slot]}: updates to it wait for the new "
                    f"slot map (epoch > {view.epoch}); retry",
                    Reason.SLOT_FROZEN,
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
                f"cluster.max_message_mb={self.max_message_bytes >> 20}; split the lookup",
                reason=Reason.REPLY_TOO_LARGE,
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
                f"{step - 1 - max_staleness} is applied",
                Reason.STALENESS_BOUND,
            )
        mirror = data.place.mirror
        use_mirror = mirror is not None and mirror.dtype == TORCH_DTYPES.get(dtype)
        src = mirror if use_mirror else data.weights
        assert src is not None
        return LookupPlan(
            src=src,
            pos=pos,
            dtype=dtype,
            epoch=view.epoch,
            applied_step=applied,
            dim=layout.dim,
            src_rows=data.opaque_rows(use_mirror) if src.dtype == ROW_DTYPES[dtype] else None,
        )

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
            raise precondition(
                f"optimizer.kind: this shard keeps {self.kind} state; cannot apply {kind}", Reason.OPTIMIZER_MISMATCH
            )
        params = optimizer_params(kind, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
        if step < 1:
            raise invalid(f"step: must be >= 1 (1-based optimizer step), got {step}")
        if step <= self.applied_step[table]:
            raise precondition(
                f"step {step} for table {table} is from the past: step {self.applied_step[table]} is already applied",
                Reason.STEP_FROM_PAST,
            )
        head = self.head_step(table)  # slots copied in at a later step bound the jump, not the oldest slot
        if step > head + self.max_step_jump:
            raise precondition(
                f"step {step} for table {table} is too far ahead: the shard has applied step "
                f"{head} and takes at most step {head + self.max_step_jump} "
                f"next (cluster.max_step_jump={self.max_step_jump}); restore a checkpoint or resume from the "
                "shard's applied step",
                Reason.STEP_TOO_FAR_AHEAD,
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
        rows, grads = upd.rows, upd.grads  # (U,), (U, D)
        behind = self.behind(upd.table, rows, upd.step)  # slots copied after this step already hold it
        if behind is not None:
            rows, grads = rows[behind], grads[torch.from_numpy(behind)]
        idx = torch.from_numpy(self.positions(self.view, upd.table, rows, for_update=True))
        w = data.weights.index_select(0, idx).float()  # (U, D) fp32 (bf16/fp16 storage: computed in fp32)
        if isinstance(upd.params, AdamParams):
            m, v = (s.index_select(0, idx) for s in data.state)  # (U, D) each
            lazy_adam_(w, m, v, g=grads, step=upd.step, p=upd.params)
            data.state[0].index_copy_(0, idx, m)
            data.state[1].index_copy_(0, idx, v)
        else:
            acc = data.state[0].index_select(0, idx)  # (U,)
            rowwise_adagrad_(w, acc, grads, p=upd.params)
            data.state[0].index_copy_(0, idx, acc)
        shm = data.place.shm
        if shm is not None:
            shm.begin_write()
        data.weights.index_copy_(0, idx, w.to(data.weights.dtype))
        data.place.refresh_mirror(idx, w)
        self.advance_steps(upd.table, upd.step)
        if shm is not None:
            shm.end_write(self.applied_step[upd.table])
        return int(rows.size)

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
