"""Token ids -> global table rows of every Engram layer: pure, cheap, no I/O.

This is the first stage of the prefetch pipeline: it only needs the token ids, so a worker
runs it before the forward pass reaches the Engram layer and ships the rows to the shards.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.layout import TableLayout, table_layouts


class EngramIndexer(nn.Module):
    """raw ids (B, T) -> {layer: (unique_rows (U,), inverse (B, T, Hn))}."""

    compress: torch.Tensor  # (V,) raw id -> canonical id

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
        self.register_buffer("compress", torch.from_numpy(lookup), persistent=False)
        for layer, layout in self.layouts.items():
            self.register_buffer(f"offsets_{layer}", torch.from_numpy(layout.head_offsets), persistent=False)

    def global_rows(self, ids_BT: torch.Tensor) -> dict[int, torch.Tensor]:
        """(B, T) raw ids -> {layer: (B, T, Hn) global row ids}."""
        if int(ids_BT.max()) >= self.compress.numel() or int(ids_BT.min()) < 0:
            raise ValueError(f"input ids must be in [0, {self.compress.numel()}) for this tokenizer")
        hashed = self.hasher.hash(self.compress[ids_BT])  # {layer: (B, T, Hn)}
        return {layer: idx + getattr(self, f"offsets_{layer}") for layer, idx in hashed.items()}

    def forward(self, ids_BT: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for layer, rows in self.global_rows(ids_BT).items():
            unique, inverse = torch.unique(rows, return_inverse=True)  # (U,), (B, T, Hn)
            out[layer] = (unique, inverse)
        return out
