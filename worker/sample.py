"""Offline text generation from a checkpoint (the main job's closing sample).

Greedy decoding of a small model falls into loops ("the the the"); the default is seeded
nucleus sampling (temperature 0.8, top_p 0.95, seed 0): varied text, reproducible per seed.
Decoding runs on the KV cache (`engram.decode`), one token per step.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from engram.checkpoint import load_model
from engram.decode import SeqState, extend, make_pool
from worker.engine import sample_next


@torch.no_grad()
def sample_from_checkpoint(
    checkpoint: str,
    prompt: str,
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> str:
    """Continue `prompt` with the model in `checkpoint` (local tables); returns the new text only."""
    if not prompt:
        raise ValueError("prompt: empty")
    model, cfg, tok_json = load_model(checkpoint)
    model.eval()
    tok = Tokenizer.from_str(tok_json)
    n = cfg.model.max_seq_len
    ids = tok.encode(prompt, add_special_tokens=False).ids[-n:]
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(model, budget_bytes=2 * _seq_bytes(model), block_size=16)
    state, window, new = SeqState(), list(ids), []
    feed = list(window)
    for _ in range(max_new_tokens):
        if state.length + len(feed) > n:  # context shift: keep the last half of the window
            state.release(pool)
            window = window[-(n // 2) :]
            feed = list(window)
        state.reserve(pool, state.length + len(feed))
        rows_at = _local_rows(model, window, len(feed)) if model.indexer is not None else None
        logits = extend(model, pool, [state], new_ids=[feed], rows_at=rows_at)[0, -1]  # (V,)
        token = sample_next(
            torch.log_softmax(logits[: tok.get_vocab_size()].float(), -1),
            temperature=temperature,
            top_k=0,
            top_p=top_p,
            generator=gen,
        )
        new.append(token)
        window.append(token)
        feed = [token]
    return tok.decode(new)


def _seq_bytes(model) -> int:  # type: ignore[no-untyped-def]
    m = model.cfg.model
    return 2 * m.n_layer * (m.max_seq_len + 16) * m.d_model * 4


def _local_rows(model, window: list[int], count: int):  # type: ignore[no-untyped-def]
    """rows_at for the last `count` positions of `window` from the model's own tables (hashes need N-1 back)."""
    ctx = torch.tensor([window[-(count + model.cfg.engram.max_ngram_size - 1) :]])

    def rows_at(layer: int) -> torch.Tensor:
        g = model.indexer.global_rows(ctx)[layer][:, -count:]  # (1, count, Hn)
        return model.tables[str(layer)](g.flatten()).view(1, count, g.shape[-1], -1)  # (1, count, Hn, dh)

    return rows_at
