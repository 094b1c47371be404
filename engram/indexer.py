"""Token ids -> global table rows of every Engram layer: pure, cheap, no I/O.

This is the first stage of the prefetch pipeline: it only needs the token ids, so a worker
runs it before the forward pass reaches the Engram layer and ships the rows to the shards.

It runs on the CPU, from the ids the data loader (or the request) already holds there: on a
GPU the range check (`int(max)`) and `torch.unique` (an output of data-dependent size) would
each make the host wait for the device, so the CPU could never run ahead of the GPU and the
lookups could not overlap the layers before the Engram layer. The unique rows are needed on
the CPU anyway (they are what is sent to the shards); the inverse index goes to the device
with `to_device`, a non-blocking copy from pinned memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.layout import TableLayout, table_layouts


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait (non-blocking from pinned memory)."""
    if t.device == device:
        return t
    if device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class EngramIndexer(nn.Module):
    """raw ids (B, T) -> {layer: (unique_rows (U,), inverse (B, T, Hn))}, CPU int64 tensors."""

    def __init__(self, cfg: EngramConfig, compress_lookup: np.ndarray) -> None:
        super().__init__()
        lookup = np.asarray(compress_lookup, dtype=np.int64)
        if lookup.ndim != 1 or lookup.size == 0:
            raise ValueError("compress_lookup: expected a non-empty (vocab,) array")
        if not 0 <= cfg.pad_id < lookup.size:
            raise ValueError(f"engram.pad_id: {cfg.pad_id} is outside the tokenizer's {lookup.size} ids")
        self.layouts: dict[int, TableLayout] = table_layouts(cfg)
        self.hasher = NgramHasher(
            compressed_vocab_size=int(lookup.max()) + 1,
            table_size_per_ngram=list(cfg.table_size_per_ngram),
            max_ngram_size=cfg.max_ngram_size,
            n_head_per_ngram=cfg.n_head_per_ngram,
            layer_ids=list(cfg.layer_ids),
            pad_id=int(lookup[cfg.pad_id]),  # positions before the start hold the *compressed* pad id
            seed=cfg.seed,
        )
        # plain CPU tensors, not buffers: `model.to("cuda")` must leave the index math on the CPU
        self.compress = torch.from_numpy(lookup)  # (V,) raw id -> canonical id
        self.offsets = {layer: torch.from_numpy(layout.head_offsets) for layer, layout in self.layouts.items()}

    def global_rows(self, ids_BT: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, T) raw ids -> {layer: (B, T, Hn) global row ids}, on the CPU."""
        ids = _on_cpu(ids_BT)
        if ids.numel() and (int(ids.max()) >= self.compress.numel() or int(ids.min()) < 0):
            raise ValueError(f"input ids must be in [0, {self.compress.numel()}) for this tokenizer")
        hashed = self.hasher.hash(self.compress[ids])  # {layer: (B, T, Hn)}
        return {layer: idx + self.offsets[layer] for layer, idx in hashed.items()}

    def forward(self, ids_BT: torch.Tensor, *, pin: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """`pin`: put the results in pinned memory, ready for a non-blocking copy to a GPU."""
        out = {}
        for layer, rows in self.global_rows(ids_BT).items():
            unique, inverse = torch.unique(rows, return_inverse=True)  # (U,), (B, T, Hn); sorted
            out[layer] = (unique.pin_memory(), inverse.pin_memory()) if pin else (unique, inverse)
        return out


def _on_cpu(ids_BT: torch.Tensor) -> torch.Tensor:
    """Callers pass the CPU ids they hold; device ids cost one device -> host copy (a sync)."""
    return ids_BT if ids_BT.device.type == "cpu" else ids_BT.detach().cpu()
