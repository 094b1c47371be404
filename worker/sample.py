"""Offline text generation from a checkpoint (the main job's closing sample)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from trainer.checkpoint import load_model
from worker.engine import sample_next


@torch.no_grad()
def sample_from_checkpoint(
    checkpoint: str, prompt: str, *, max_new_tokens: int = 48, temperature: float = 0.0, seed: int = 0
) -> str:
    """Continue `prompt` with the model in `checkpoint` (local tables); returns the new text only."""
    if not prompt:
        raise ValueError("prompt: empty")
    model, cfg, tok_json = load_model(checkpoint)
    tok = Tokenizer.from_str(tok_json)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    gen = torch.Generator().manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = (ids + new)[-cfg.model.max_seq_len :]
        logits, _ = model(torch.tensor([window]))
        new.append(sample_next(torch.log_softmax(logits[0, -1].float(), dim=-1), temperature=temperature,
                               top_k=0, top_p=1.0, generator=gen))
    return tok.decode(new)
