"""The shard store's value types: a table's arrays, a slot's block, a validated lookup or update.

Replaced whole or built per request; nothing here touches a table (store.py, ownership.py do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engram.row_optim import AdagradParams, AdamParams
from services.shard.errors import invalid
from services.shard.shm_table import Placement

OPTIMIZERS = ("adam", "adagrad")


@dataclass(slots=True)
class TableData:
    base: np.ndarray  # (num_slots,) int64, -1 = slot not owned
    weights: torch.Tensor  # (R, D) fp32, or (R, storage cols) in engram.row_format (row_store_format.py)
    state: tuple[torch.Tensor, ...]  # adam: m, v (R, D); adagrad: acc (R,); () for read-only (fp8) tables
    place: Placement  # where weights live, the mirror (R, D) bf16/fp16 if kept, the shared file if any
    all_owned: bool = field(init=False)  # every slot has rows here: lookups skip the per-id ownership pass
    _opaque: dict[bool, np.ndarray] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.all_owned = bool(self.base.size) and int(self.base.min()) >= 0

    def opaque_rows(self, mirror: bool) -> np.ndarray:
        """The mirror's (or the weights') (R,) rows as opaque numpy items on their memory, made once:
        a gather of whole rows is then one `take` (a view per lookup costs more than a 1K-row gather's
        share of it)."""
        rows = self._opaque.get(mirror)
        if rows is None:
            src = self.place.mirror if mirror else self.weights
            assert src is not None
            raw = src.view(torch.uint8).numpy()  # (R, row bytes)
            rows = self._opaque[mirror] = raw.view(np.dtype((np.void, raw.shape[1]))).reshape(src.shape[0])
        return rows


@dataclass(frozen=True, slots=True)
class LookupPlan:
    """A validated lookup: gather src[pos] (src: the mirror when it has the wire dtype, else weights)."""

    src: torch.Tensor  # (R, D), or (R, D + D/32) uint8 for fp8 storage
    pos: np.ndarray  # (n,) int64
    dtype: int
    epoch: int
    applied_step: int
    dim: int = 0  # values per row D
    src_rows: np.ndarray | None = None  # (R,) src's rows as opaque items when src is in the wire dtype, else None


@dataclass(slots=True)
class SlotData:
    """One (table, slot) block: views into a table, or a staged copy received from a peer."""

    weights: torch.Tensor  # (n, D) fp32, or (n, storage cols) in the table's storage format
    state: tuple[torch.Tensor, ...]  # adam: m, v (n, D); adagrad: acc (n,); () for read-only tables
    applied_step: int  # the last step whose updates this slot's rows hold (per slot: ownership.py)


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
