"""The Engram module: hashed N-gram rows -> gated, convolved residual update.

The embedding lookup is a separate step (`EngramRows`): indices -> rows may come from the
local table (`LocalEngramTable`) or from remote memory shards. The layer only sees rows.

Shapes: B batch, T time, M hyper-connection branches, D d_model, Hn heads per layer
((N-1) * heads per order), dh dims per head, E = Hn * dh, U unique rows in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.init import init_rows
from engram.layout import TableLayout


@dataclass
class EngramRows:
    """One layer's rows for one batch: the seam between addressing and the model."""

    rows: torch.Tensor  # (U, dh) unique rows; a grad-requiring leaf when they came from shards
    inverse: torch.Tensor  # (B, T, Hn) int64 positions into `rows`

    def embeddings(self) -> torch.Tensor:
        # F.embedding, not `rows[inverse]`: the backward of advanced indexing is
        # index_put_(accumulate=True), whose multi-threaded CPU kernel sums duplicate rows in
        # a thread-dependent order (two 2-thread runs drift apart); embedding_backward is
        # bit-stable on CPU at any thread count.
        B, T, Hn = self.inverse.shape
        e = F.embedding(self.inverse, self.rows)  # (B, T, Hn, dh)
        return e.reshape(B, T, Hn * self.rows.shape[1])  # (B, T, E)


class LocalEngramTable(nn.Module):
    """A layer's whole table in local memory; initialised exactly as the shards initialise it."""

    def __init__(self, layout: TableLayout, *, seed: int, std: float) -> None:
        super().__init__()
        self.layout = layout
        rows = init_rows(seed=seed, layer_id=layout.layer_id, rows=np.arange(layout.num_rows), dim=layout.dim, std=std)
        self.weight = nn.Parameter(torch.from_numpy(rows))  # (R, dh)

    def forward(self, unique_ids: torch.Tensor) -> torch.Tensor:
        """(U,) global rows -> (U, dh); the gradient is sparse (only touched rows)."""
        return F.embedding(unique_ids, self.weight, sparse=True)


class ShortConv(nn.Module):
    """Causal depthwise Conv1d over time on RMSNorm'd branches, then SiLU (the demo's ShortConv)."""

    def __init__(self, *, d_model: int, hc_mult: int, kernel_size: int, dilation: int, eps: float) -> None:
        super().__init__()
        channels = d_model * hc_mult
        self.norms = nn.ModuleList([nn.RMSNorm(d_model, eps=eps) for _ in range(hc_mult)])
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )
        nn.init.zeros_(self.conv.weight)  # the paper zero-inits the conv: Y starts as the gated value

    def forward(self, x_BTMD: torch.Tensor) -> torch.Tensor:
        B, T, M, D = x_BTMD.shape
        normed = torch.cat([self.norms[m](x_BTMD[:, :, m]) for m in range(M)], dim=-1)  # (B, T, M*D)
        y = self.conv(normed.transpose(1, 2))[..., :T]  # (B, M*D, T), causal crop
        return F.silu(y).transpose(1, 2).reshape(B, T, M, D)


class EngramLayer(nn.Module):
    """Y = alpha * v + SiLU(conv(RMSNorm(alpha * v))), one gate (and key projection) per branch.

    Ablations: `gate=False` -> alpha = 1; `short_conv=False` -> Y = alpha * v; `shared_keys=True`
    -> one key projection for all branches. `key_norm_eps=None` is torch's default (the dtype's
    machine epsilon), as the demo's key/query RMSNorms.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        d_model: int,
        hc_mult: int,
        kernel_size: int,
        max_ngram_size: int,
        eps: float,
        key_norm_eps: float | None = None,
        gate: bool = True,
        short_conv: bool = True,
        shared_keys: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.use_gate = gate
        self.value_proj = nn.Linear(embed_dim, d_model)
        n_keys = 1 if shared_keys else hc_mult
        self.key_projs = nn.ModuleList([nn.Linear(embed_dim, d_model) for _ in range(n_keys)])
        self.key_norms = nn.ModuleList([nn.RMSNorm(d_model, eps=key_norm_eps) for _ in range(n_keys)])
        self.query_norms = nn.ModuleList([nn.RMSNorm(d_model, eps=key_norm_eps) for _ in range(hc_mult)])
        self.short_conv: ShortConv | None = None
        if short_conv:
            self.short_conv = ShortConv(
                d_model=d_model, hc_mult=hc_mult, kernel_size=kernel_size, dilation=max_ngram_size, eps=eps
            )

    def gates(self, h_BTMD: torch.Tensor, e_BTE: torch.Tensor) -> torch.Tensor:
        """alpha in (0, 1), shape (B, T, M); all ones when the gate is ablated."""
        if not self.use_gate:
            return h_BTMD.new_ones(h_BTMD.shape[:3])
        out = []
        for m, q_norm in enumerate(self.query_norms):
            i = m % len(self.key_projs)  # 0 for every branch when the keys are shared
            k = self.key_norms[i](self.key_projs[i](e_BTE))  # (B, T, D)
            q = q_norm(h_BTMD[:, :, m])  # (B, T, D)
            g = (k * q).sum(-1) / math.sqrt(self.d_model)  # (B, T)
            g = g.abs().clamp_min(1e-6).sqrt() * g.sign()  # the demo's signed sqrt
            out.append(torch.sigmoid(g))
        return torch.stack(out, dim=2)

    def forward(self, h_BTMD: torch.Tensor, rows: EngramRows) -> tuple[torch.Tensor, torch.Tensor]:
        e = rows.embeddings().to(h_BTMD.dtype)  # (B, T, E)
        alpha = self.gates(h_BTMD, e)  # (B, T, M)
        value = alpha.unsqueeze(-1) * self.value_proj(e).unsqueeze(2)  # (B, T, M, D)
        if self.short_conv is None:
            return value, alpha
        return value + self.short_conv(value), alpha
