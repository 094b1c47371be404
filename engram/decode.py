"""Incremental forward of an `EngramLM`: a paged KV cache and cached short-conv state.

`extend(model, pool, seqs, new_ids=..., rows_at=...)` runs a ragged batch in which sequence b
already holds `seqs[b].length` cached positions (0 for a fresh prompt) and appends
`len(new_ids[b])` tokens: a prefill chunk or one decode token. It returns the logits of
the new positions and writes their K/V into the pool and their conv inputs into the
sequence state, so the next call continues where this one stopped. The result equals the
full-window forward (up to float reassociation).

What each sub-layer needs from the past:
- attention: K and V of every earlier position, kept in fixed-size blocks of a shared pool
  (`KVPool`); a sequence owns a list of blocks (its block table). Rotary positions are
  absolute, so cached keys never change.
- Engram short conv: a causal depthwise conv of kernel K and dilation d reads inputs
  t, t-d, ..., t-(K-1)d, so a sequence keeps its last (K-1)*d normed conv inputs.
- Engram gates/value and hyper-connection reads/writes are per position: no state.
- The N-gram hashes are computed by the caller (they need only the last N-1 token ids).

Pure torch, no I/O: the caller supplies the rows per layer (`rows_at(layer)` -> (B, n, Hn, dh)).

Shapes: B sequences in the batch, n new positions (padded to the longest), L = past + n
keys, nh heads, hd head dim, M branches, D d_model, C = M*D conv channels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from engram.engram_layer import ShortConv
from engram.model import Attention, Block, EngramLM, apply_rotary


class OutOfBlocks(RuntimeError):
    """The KV pool has fewer free blocks than asked for."""


class KVPool:
    """Fixed pool of KV blocks for every layer: k, v (n_layer, num_blocks * block_size, nh, hd)."""

    def __init__(
        self,
        *,
        n_layer: int,
        n_head: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size < 1 or num_blocks < 1:
            raise ValueError(f"KV pool: block_size and num_blocks must be >= 1, got {block_size}, {num_blocks}")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layer, num_blocks * block_size, n_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids are handed out first

    @staticmethod
    def bytes_per_block(*, n_layer: int, n_head: int, head_dim: int, block_size: int, itemsize: int = 4) -> int:
        return 2 * n_layer * block_size * n_head * head_dim * itemsize

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, length: int) -> int:
        return -(-length // self.block_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} KV blocks asked for, {len(self._free)} free of {self.num_blocks}")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()

    def slots(self, blocks: list[int], start: int, stop: int) -> torch.Tensor:
        """Pool rows of positions start..stop-1 of a sequence with block table `blocks` -> (stop-start,)."""
        pos = torch.arange(start, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass(slots=True)
class SeqState:
    """One sequence's cache: its blocks, how many positions they hold, and the conv tails."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    conv: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (S, C) last normed conv inputs

    def reserve(self, pool: KVPool, new_len: int) -> None:
        """Own enough blocks for `new_len` positions (raises OutOfBlocks, owning what it had)."""
        need = pool.blocks_for(new_len) - len(self.blocks)
        if need > 0:
            self.blocks.extend(pool.alloc(need))

    def release(self, pool: KVPool) -> None:
        pool.free(self.blocks)
        self.length = 0
        self.conv.clear()


def make_pool(model: EngramLM, *, budget_bytes: int, block_size: int, device: torch.device | str = "cpu") -> KVPool:
    """As many fp32 blocks as fit `budget_bytes` (at least one sequence of max_seq_len)."""
    m = model.cfg.model
    hd = m.d_model // m.n_head
    per = KVPool.bytes_per_block(n_layer=m.n_layer, n_head=m.n_head, head_dim=hd, block_size=block_size)
    num = budget_bytes // per
    if num < -(-m.max_seq_len // block_size):
        raise ValueError(
            f"worker.kv_cache_mb: {budget_bytes / 2**20:g} MiB holds {num} blocks of {per} B, fewer than one "
            f"sequence of model.max_seq_len={m.max_seq_len} tokens needs"
        )
    return KVPool(
        n_layer=m.n_layer, n_head=m.n_head, head_dim=hd, block_size=block_size, num_blocks=int(num), device=device
    )


@dataclass(slots=True)
class _Plan:
    """Index tensors of one extend, shared by every layer."""

    new_slots: torch.Tensor  # (N,) pool rows the N valid new positions are written to
    new_src: torch.Tensor  # (N,) their index in the flattened (B*n) batch
    gather: torch.Tensor  # (B, L) pool rows of every cached + new position (padding: row 0)
    mask: torch.Tensor  # (B, 1, n, L) bool, True = may attend


def _plan(pool: KVPool, seqs: list[SeqState], counts: list[int], *, n: int, device: torch.device) -> _Plan:
    B = len(seqs)
    past = torch.tensor([s.length for s in seqs])  # (B,)
    cnt = torch.tensor(counts)  # (B,)
    total = past + cnt
    L = int(total.max())
    nb = max(len(s.blocks) for s in seqs)
    table = torch.zeros((B, nb), dtype=torch.long)
    for b, s in enumerate(seqs):
        table[b, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.long)
    pos = torch.arange(L)  # (L,)
    rows = table[:, pos // pool.block_size] * pool.block_size + pos % pool.block_size  # (B, L)
    valid_key = pos.unsqueeze(0) < total.unsqueeze(1)  # (B, L)
    gather = torch.where(valid_key, rows, torch.zeros_like(rows))
    i = torch.arange(n)  # (n,)
    new_pos = past.unsqueeze(1) + i.unsqueeze(0)  # (B, n)
    valid_new = i.unsqueeze(0) < cnt.unsqueeze(1)  # (B, n)
    new_rows = rows.gather(1, new_pos.clamp(max=L - 1))  # (B, n)
    mask = (pos.view(1, 1, L) <= new_pos.unsqueeze(2)) & valid_key.unsqueeze(1)  # (B, n, L) causal, own keys
    return _Plan(
        new_slots=new_rows[valid_new].to(device),
        new_src=torch.nonzero(valid_new.flatten()).flatten().to(device),
        gather=gather.to(device),
        mask=mask.unsqueeze(1).to(device),
    )


def _attention(
    block_attn: Attention,
    x_BnD: torch.Tensor,
    *,
    layer: int,
    pool: KVPool,
    plan: _Plan,
    cos_Bn: torch.Tensor,
    sin_Bn: torch.Tensor,
) -> torch.Tensor:
    B, n, D = x_BnD.shape
    nh = block_attn.n_head
    hd = D // nh
    qkv = block_attn.qkv(x_BnD).view(B, n, 3, nh, hd)
    q, k, v = qkv.unbind(2)  # (B, n, nh, hd)
    q = apply_rotary(q.transpose(1, 2), cos_Bn.unsqueeze(1), sin_Bn.unsqueeze(1))  # (B, nh, n, hd)
    k = apply_rotary(k.transpose(1, 2), cos_Bn.unsqueeze(1), sin_Bn.unsqueeze(1)).transpose(1, 2)  # (B, n, nh, hd)
    pool.k[layer].index_copy_(0, plan.new_slots, k.reshape(B * n, nh, hd)[plan.new_src])
    pool.v[layer].index_copy_(0, plan.new_slots, v.reshape(B * n, nh, hd)[plan.new_src])
    keys = pool.k[layer][plan.gather]  # (B, L, nh, hd)
    vals = pool.v[layer][plan.gather]
    y = F.scaled_dot_product_attention(q, keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=plan.mask)
    return block_attn.proj(y.transpose(1, 2).reshape(B, n, D))


def _short_conv(
    sc: ShortConv, value_BnMD: torch.Tensor, *, layer: int, seqs: list[SeqState], counts: list[int]
) -> torch.Tensor:
    """SiLU(causal dilated depthwise conv(RMSNorm(value))) with each sequence's cached tail."""
    B, n, M, D = value_BnMD.shape
    normed = torch.cat([sc.norms[m](value_BnMD[:, :, m]) for m in range(M)], dim=-1)  # (B, n, C)
    weight = sc.conv.weight[:, 0]  # (C, K)
    K, dil = int(weight.shape[1]), int(sc.conv.dilation[0])
    S = (K - 1) * dil
    zero = normed.new_zeros((S, M * D))  # before the start: the conv's zero padding
    tails = torch.stack([s.conv.get(layer, zero) for s in seqs])  # (B, S, C)
    x = torch.cat([tails, normed], dim=1)  # (B, S + n, C)
    out = x[:, 0:n] * weight[:, 0]
    for k in range(1, K):  # output t reads x[t + k*dil] in this shifted frame
        out = out + x[:, k * dil : k * dil + n] * weight[:, k]
    for b, (s, c) in enumerate(zip(seqs, counts)):
        s.conv[layer] = x[b, c : c + S]  # (S, C) the newest S inputs
    return F.silu(out).reshape(B, n, M, D)


def extend(
    model: EngramLM,
    pool: KVPool,
    seqs: list[SeqState],
    *,
    new_ids: list[list[int]],
    rows_at: Callable[[int], torch.Tensor] | None = None,
    knockout: torch.Tensor | None = None,
    gates_out: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Append new tokens to each sequence's cache; -> logits (B, n, V) of the new positions.

    `rows_at(layer)` -> (B, n, Hn, dh) Engram rows of the new tokens (padding rows: any);
    `knockout` (B,) bool switches the Engram branch off for those sequences;
    `gates_out` receives {layer: alpha (B, n, M)}. Blocks must be reserved by the caller.
    """
    assert len(seqs) == len(new_ids) and all(new_ids)
    counts = [len(t) for t in new_ids]
    B, n = len(seqs), max(counts)
    dev = model.tok_emb.weight.device
    max_len = model.cfg.model.max_seq_len
    for s, c in zip(seqs, counts):
        if s.length + c > max_len:
            raise ValueError(f"sequence of {s.length + c} tokens exceeds model.max_seq_len={max_len}")
        assert pool.blocks_for(s.length + c) <= len(s.blocks), "reserve blocks before extend"
    ids = torch.zeros((B, n), dtype=torch.long, device=dev)
    pos = torch.zeros((B, n), dtype=torch.long, device=dev)
    for b, (s, t) in enumerate(zip(seqs, new_ids)):
        ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        pos[b] = torch.arange(s.length, s.length + n).clamp_(max=max_len - 1)
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]  # (B, n, hd/2)
    plan = _plan(pool, seqs, counts, n=n, device=dev)
    x = model.tok_emb(ids)  # (B, n, D)
    h = x.unsqueeze(2).expand(B, n, model.cfg.model.hc_mult, x.shape[-1])  # (B, n, M, D)
    for i, mod in enumerate(model.blocks):
        block = cast(Block, mod)
        eng = block.engram
        if eng is not None:
            assert rows_at is not None, "an Engram layer needs its rows"
            r = rows_at(i)  # (B, n, Hn, dh)
            e = r.reshape(B, n, -1).to(h.dtype)  # (B, n, E)
            alpha = eng.gates(h, e)  # (B, n, M)
            value = alpha.unsqueeze(-1) * eng.value_proj(e).unsqueeze(2)  # (B, n, M, D)
            y = (
                value
                if eng.short_conv is None
                else value + _short_conv(eng.short_conv, value, layer=i, seqs=seqs, counts=counts)
            )  # short_conv None: the ablation
            if knockout is not None:
                y = y * (~knockout).to(y.dtype).view(B, 1, 1, 1)
            h = h + y
            if gates_out is not None:
                gates_out[i] = alpha
        a = _attention(
            block.attn,
            block.attn_norm(block.hc_attn.read_input(h)),
            layer=i,
            pool=pool,
            plan=plan,
            cos_Bn=cos,
            sin_Bn=sin,
        )
        h = block.hc_attn.write_output(h, a)
        h = block.hc_mlp.write_output(h, block.mlp(block.mlp_norm(block.hc_mlp.read_input(h))))
    for s, c in zip(seqs, counts):
        s.length += c
    return model.lm_head(model.norm(h.sum(dim=2)))  # (B, n, V)
