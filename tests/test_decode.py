"""Incremental decode (KV cache + cached conv state) equals the full-window forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.decode import KVPool, OutOfBlocks, SeqState, extend, make_pool
from engram.model import EngramLM


def model_of(*overrides: str) -> EngramLM:
    cfg = load_config("tiny", None, list(overrides))
    torch.manual_seed(0)
    model = EngramLM(cfg, np.arange(cfg.model.vocab_size) % 300).eval()
    with torch.no_grad():  # the paper zero-inits the conv; random weights make its state matter
        for block in model.blocks:
            if block.engram is not None:
                if block.engram.short_conv is not None:
                    block.engram.short_conv.conv.weight.normal_(0, 0.5)
    return model


def rows_fn(model: EngramLM, contexts: list[list[int]], counts: list[int]):
    """rows_at for a batch: the new tokens' rows hashed from each full context, from the local tables."""
    n = max(counts)

    def rows_at(layer: int) -> torch.Tensor:
        assert model.indexer is not None
        out = []
        for ctx, c in zip(contexts, counts):
            g = model.indexer.global_rows(torch.tensor([ctx]))[layer][0, -c:]  # (c, Hn)
            r = model.tables[str(layer)].weight[g]  # (c, Hn, dh)
            out.append(torch.cat([r, r.new_zeros((n - c, *r.shape[1:]))]))
        return torch.stack(out)  # (B, n, Hn, dh)

    return rows_at


@torch.no_grad()
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.hc_mult=2"],
        ["engram.max_ngram_size=4", "engram.table_size_per_ngram=[997,991,983]"],
        ["model.hc_mult=2", "engram.short_conv=false", "engram.gate=false", "engram.shared_keys=true"],  # ablations
    ],
)
def test_prefill_then_decode_equals_full_forward(overrides) -> None:
    model = model_of(*overrides)
    pool = make_pool(model, budget_bytes=1 << 20, block_size=4)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 11, 1)]
    seqs = [SeqState() for _ in prompts]
    for s, p in zip(seqs, prompts):
        s.reserve(pool, len(p))
    logits = extend(model, pool, seqs, new_ids=prompts, rows_at=rows_fn(model, prompts, [len(p) for p in prompts]))
    for b, p in enumerate(prompts):  # ragged prefill in one batch
        ref, _ = model(torch.tensor([p]))
        torch.testing.assert_close(logits[b, : len(p)], ref[0], rtol=1e-5, atol=1e-5)
    toks = [list(p) for p in prompts]
    for _ in range(12):  # decode: one token per sequence per step
        nxt = [[int(torch.randint(0, 512, (1,), generator=gen))] for _ in toks]
        for s, t, x in zip(seqs, toks, nxt):
            t.extend(x)
            s.reserve(pool, len(t))
        logits = extend(model, pool, seqs, new_ids=nxt, rows_at=rows_fn(model, toks, [1] * len(toks)))
        for b, t in enumerate(toks):
            ref, _ = model(torch.tensor([t]))
            torch.testing.assert_close(logits[b, 0], ref[0, -1], rtol=1e-5, atol=1e-5)
    used = pool.used_blocks
    assert used == sum(pool.blocks_for(len(t)) for t in toks)
    for s in seqs:
        s.release(pool)
    assert pool.used_blocks == 0 and pool.free_blocks == pool.num_blocks


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill_and_knockout_removes_the_branch() -> None:
    model = model_of()
    pool = make_pool(model, budget_bytes=1 << 20, block_size=8)
    prompt = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    s = SeqState()
    s.reserve(pool, 30)
    outs = []
    for a, b in ((0, 7), (7, 19), (19, 30)):
        outs.append(extend(model, pool, [s], new_ids=[prompt[a:b]], rows_at=rows_fn(model, [prompt[:b]], [b - a]))[0])
    ref, _ = model(torch.tensor([prompt]))
    torch.testing.assert_close(torch.cat(outs), ref[0], rtol=1e-5, atol=1e-5)
    # knockout: equals a forward whose Engram output is zero
    s2 = SeqState()
    s2.reserve(pool, 30)
    gates: dict[int, torch.Tensor] = {}
    ko = extend(
        model,
        pool,
        [s2],
        new_ids=[prompt],
        rows_at=rows_fn(model, [prompt], [30]),
        knockout=torch.tensor([True]),
        gates_out=gates,
    )
    assert set(gates) == {1} and gates[1].shape == (1, 30, 1) and bool(((gates[1] > 0) & (gates[1] < 1)).all())
    eng = model.blocks[1].engram
    saved = eng.forward
    eng.forward = lambda h, rows: (torch.zeros_like(h), torch.zeros(h.shape[:3]))  # type: ignore[method-assign]
    try:
        ref_ko, _ = model(torch.tensor([prompt]))
    finally:
        eng.forward = saved  # type: ignore[method-assign]
    torch.testing.assert_close(ko[0], ref_ko[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ko[0], ref[0], atol=1e-3)


def test_pool_is_bounded_and_blocks_come_back() -> None:
    model = model_of()
    with pytest.raises(ValueError, match="worker.kv_cache_mb"):
        make_pool(model, budget_bytes=1000, block_size=16)
    pool = KVPool(n_layer=2, n_head=2, head_dim=16, block_size=4, num_blocks=3)
    s = SeqState()
    s.reserve(pool, 12)
    assert pool.free_blocks == 0
    with pytest.raises(OutOfBlocks, match="1 KV blocks asked for, 0 free of 3"):
        SeqState().reserve(pool, 1)
    s.release(pool)
    assert pool.free_blocks == 3 and s.blocks == []
