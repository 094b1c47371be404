"""Where every Engram row lives: per-layer tables, head offsets, and the slot addressing.

A layer's table is the concatenation of its heads' tables in hash output order; a head's
index i maps to global row `head_offset[j] + i`. Global rows of every table map to one
of `num_slots` slots by `slot = row % num_slots`; inside a slot, a row sits at
`row // num_slots`. Slots are the unit that moves between shards and the unit of a
checkpoint, so a checkpoint restores onto any number of shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engram.config import EngramConfig
from engram.hashing import head_table_sizes


@dataclass(frozen=True, slots=True)
class TableLayout:
    layer_id: int
    head_sizes: tuple[int, ...]  # one prime per head, output order
    dim: int  # dims per head row

    @property
    def num_rows(self) -> int:
        return sum(self.head_sizes)

    @property
    def head_offsets(self) -> np.ndarray:
        """(heads,) int64 offset of each head's block inside the layer table."""
        return np.concatenate([[0], np.cumsum(self.head_sizes[:-1])]).astype(np.int64)

    @property
    def nbytes_fp32(self) -> int:
        return self.num_rows * self.dim * 4


def table_layouts(cfg: EngramConfig) -> dict[int, TableLayout]:
    """layer -> TableLayout for every Engram layer of the config."""
    sizes = head_table_sizes(
        layer_ids=cfg.layer_ids,
        max_ngram_size=cfg.max_ngram_size,
        n_head_per_ngram=cfg.n_head_per_ngram,
        table_size_per_ngram=list(cfg.table_size_per_ngram),
    )
    dim = cfg.n_embed_per_ngram // cfg.n_head_per_ngram
    return {
        layer: TableLayout(layer_id=layer, head_sizes=tuple(p for per_n in sizes[layer] for p in per_n), dim=dim)
        for layer in cfg.layer_ids
    }


def slot_of(rows: np.ndarray, num_slots: int) -> np.ndarray:
    return rows % num_slots


def index_in_slot(rows: np.ndarray, num_slots: int) -> np.ndarray:
    return rows // num_slots


def slot_num_rows(num_rows: int, slot: int, num_slots: int) -> int:
    """How many of a table's rows fall into `slot`."""
    if slot >= num_rows:
        return 0
    return (num_rows - 1 - slot) // num_slots + 1


def slot_rows(num_rows: int, slot: int, num_slots: int) -> np.ndarray:
    """The global row ids held by `slot`, in in-slot order."""
    return np.arange(slot, num_rows, num_slots, dtype=np.int64)


def even_slot_map(num_slots: int, num_shards: int) -> list[int]:
    """slot -> shard, contiguous runs of slots per shard, as even as possible."""
    return [s * num_shards // num_slots for s in range(num_slots)]
