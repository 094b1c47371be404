"""A small decoder-only LM (RMSNorm, rotary attention, SwiGLU) with Engram at chosen layers.

Optional hyper-connections: the residual stream is M branches (B, T, M, D). Each block reads
a learned mix of the branches and writes its output back with learned per-branch weights;
with M = 1 this is exactly a pre-norm residual transformer. Engram adds its (B, T, M, D)
output to the branches before attention, as in the paper.

Engram rows enter `forward` through `engram_rows` (the seam for remote shards); when absent
the model looks them up in its local tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram.config import Config
from engram.engram_layer import EngramLayer, EngramRows, LocalEngramTable
from engram.indexer import EngramIndexer, to_device
from engram.precision import autocast


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd); cos/sin (T, hd/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class HyperConnection(nn.Module):
    """Static hyper-connection for one sub-layer over M branches (identity residual when M = 1)."""

    def __init__(self, hc_mult: int, layer_index: int) -> None:
        super().__init__()
        self.hc_mult = hc_mult
        if hc_mult > 1:
            read = torch.zeros(hc_mult)
            read[layer_index % hc_mult] = 1.0
            self.read = nn.Parameter(read)  # (M,) input mix
            self.mix = nn.Parameter(torch.eye(hc_mult))  # (M, M) branch-to-branch
            self.write = nn.Parameter(torch.ones(hc_mult))  # (M,) output weights

    def read_input(self, h_BTMD: torch.Tensor) -> torch.Tensor:
        if self.hc_mult == 1:
            return h_BTMD[:, :, 0]
        return torch.einsum("btmd,m->btd", h_BTMD, self.read)

    def write_output(self, h_BTMD: torch.Tensor, y_BTD: torch.Tensor) -> torch.Tensor:
        if self.hc_mult == 1:
            return h_BTMD + y_BTD.unsqueeze(2)
        return torch.einsum("btnd,nm->btmd", h_BTMD, self.mix) + self.write.view(1, 1, -1, 1) * y_BTD.unsqueeze(2)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_index: int) -> None:
        super().__init__()
        m, e = cfg.model, cfg.engram
        hidden = m.mlp_hidden or 64 * math.ceil(8 * m.d_model / 3 / 64)
        self.attn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.attn = Attention(m.d_model, m.n_head)
        self.mlp_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.mlp = SwiGLU(m.d_model, hidden)
        self.hc_attn = HyperConnection(m.hc_mult, 2 * layer_index)
        self.hc_mlp = HyperConnection(m.hc_mult, 2 * layer_index + 1)
        self.engram: EngramLayer | None = None
        if e.enabled and layer_index in e.layer_ids:
            self.engram = EngramLayer(
                embed_dim=(e.max_ngram_size - 1) * e.n_embed_per_ngram,
                d_model=m.d_model,
                hc_mult=m.hc_mult,
                kernel_size=e.kernel_size,
                max_ngram_size=e.max_ngram_size,
                eps=m.norm_eps,
                key_norm_eps=e.key_norm_eps,
                gate=e.gate,
                short_conv=e.short_conv,
                shared_keys=e.shared_keys,
            )

    def forward(
        self, h_BTMD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rows: EngramRows | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        alpha = None
        if self.engram is not None:
            assert rows is not None, "an Engram layer needs its rows"
            y, alpha = self.engram(h_BTMD, rows)
            h_BTMD = h_BTMD + y
        h_BTMD = self.hc_attn.write_output(h_BTMD, self.attn(self.attn_norm(self.hc_attn.read_input(h_BTMD)), cos, sin))
        h_BTMD = self.hc_mlp.write_output(h_BTMD, self.mlp(self.mlp_norm(self.hc_mlp.read_input(h_BTMD))))
        return h_BTMD, alpha


class EngramLM(nn.Module):
    rope_cos: torch.Tensor  # (max_seq_len, head_dim / 2)
    rope_sin: torch.Tensor

    def __init__(self, cfg: Config, compress_lookup: np.ndarray | None = None, *, local_tables: bool = True) -> None:
        """`local_tables=False`: no `LocalEngramTable`s are built (rows come from memory shards)."""
        super().__init__()
        self.cfg = cfg
        m, e = cfg.model, cfg.engram
        self.tok_emb = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(m.n_layer)])
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rotary_tables(m.max_seq_len, m.d_model // m.n_head, m.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_dense)
        self.indexer: EngramIndexer | None = None
        self.tables = nn.ModuleDict()
        if e.enabled:
            if compress_lookup is None:
                raise ValueError("compress_lookup: an Engram model needs the tokenizer compression map")
            self.indexer = EngramIndexer(e, compress_lookup)
            for layer, layout in (self.indexer.layouts if local_tables else {}).items():
                table = LocalEngramTable(layout, seed=e.seed, std=e.init_std)
                table.weight.requires_grad_(not e.freeze_table)  # frozen: rows stay at init (an ablation)
                self.tables[str(layer)] = table

    @staticmethod
    def _init_dense(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def dense_parameters(self) -> list[nn.Parameter]:
        table_ids = {id(p) for p in self.tables.parameters()}
        return [p for p in self.parameters() if id(p) not in table_ids]

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def engram_indices(self, ids_BT: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Stage 1 of a step (no I/O): {layer: (unique rows (U,), inverse (B, T, Hn))}.

        Computed on the CPU from CPU ids (pass the data loader's; device ids cost a sync),
        returned on the CPU, pinned when the model is on a GPU (see `engram.indexer`).
        """
        assert self.indexer is not None, "this model has no Engram layers"
        return self.indexer(ids_BT, pin=self.device.type == "cuda")

    def local_rows(self, indices: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, EngramRows]:
        dev = self.device
        return {
            layer: EngramRows(rows=self.tables[str(layer)](to_device(unique, dev)), inverse=to_device(inverse, dev))
            for layer, (unique, inverse) in indices.items()
        }

    def forward(
        self,
        ids_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        engram_rows: Mapping[int, EngramRows] | None = None,
        return_gates: bool = False,
        ids_cpu: torch.Tensor | None = None,
    ):  # type: ignore[no-untyped-def]
        """-> logits (B, T, V), loss (scalar or None)[, gates {layer: (B, T, M)}].

        `ids_cpu`: the same ids on the CPU, for the local tables' indices without a device sync.
        On CUDA the pass runs under `train.autocast` (bf16 by default); on CPU in fp32.
        """
        B, T = ids_BT.shape
        if T > self.cfg.model.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.model.max_seq_len}")
        if self.indexer is not None and engram_rows is None:
            engram_rows = self.local_rows(self.engram_indices(ids_BT if ids_cpu is None else ids_cpu))
        with autocast(ids_BT.device, self.cfg.train.autocast):
            return self._forward(ids_BT, targets_BT, engram_rows=engram_rows, return_gates=return_gates)

    def _forward(
        self,
        ids_BT: torch.Tensor,
        targets_BT: torch.Tensor | None,
        *,
        engram_rows: Mapping[int, EngramRows] | None,
        return_gates: bool,
    ):  # type: ignore[no-untyped-def]
        B, T = ids_BT.shape
        x = self.tok_emb(ids_BT)  # (B, T, D)
        h = x.unsqueeze(2).expand(B, T, self.cfg.model.hc_mult, x.shape[-1])  # (B, T, M, D)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        gates = {}
        for i, block in enumerate(self.blocks):
            rows = engram_rows.get(i) if engram_rows is not None and block.engram is not None else None
            h, alpha = block(h, cos, sin, rows=rows)
            if alpha is not None:
                gates[i] = alpha
        logits = self.lm_head(self.norm(h.sum(dim=2)))  # (B, T, V)
        loss = None
        if targets_BT is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets_BT.reshape(-1))
        if return_gates:
            return logits, loss, gates
        return logits, loss
