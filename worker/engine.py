"""The synchronous model side of the inference server: batched log-probs and sampling.

`ModelEngine.logprobs` runs one forward pass over a batch of token sequences of different
lengths. Sequences are right-padded: the model is causal everywhere (attention, the
N-gram hashes look back only, the short conv is causal), so the log-probs at positions
< len(seq) do not depend on the padding. Rows come through the `PrefetchPipeline` from the
configured row source (local tables or remote shards).

`sample_next` turns one position's log-probs into a token: greedy for temperature 0,
otherwise temperature, then top-k, then top-p (nucleus), with a per-request generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engram.config import Config
from engram.indexer import to_device
from engram.model import EngramLM
from worker.cache import HotRowCache
from worker.prefetch import LocalRowSource, PrefetchPipeline, RowSource


@dataclass(slots=True)
class Work:
    ids: list[int]  # the sequence, at most model.max_seq_len tokens
    last_only: bool  # True: (V,) log-probs of the next token; False: (T, V) for every position


def build_cache(model: EngramLM, cfg: Config, device: torch.device) -> HotRowCache | None:
    if cfg.worker.cache_mb <= 0 or model.indexer is None:
        return None
    dims = {layer: lay.dim for layer, lay in model.indexer.layouts.items()}
    return HotRowCache(capacity_bytes=int(cfg.worker.cache_mb * (1 << 20)), dims=dims, device=device)


class ModelEngine:
    """Batched forward passes of an `EngramLM` for Score and Generate (not thread-safe: one caller)."""

    def __init__(
        self,
        model: EngramLM,
        cfg: Config,
        *,
        source: RowSource | None = None,
        pad_id: int = 0,
        num_tokens: int | None = None,
    ) -> None:
        self.model, self.cfg, self.pad_id = model.eval(), cfg, pad_id
        # the tokenizer may have fewer ids than model.vocab_size: only real tokens get probability
        self.num_tokens = num_tokens or cfg.model.vocab_size
        self.device = next(model.parameters()).device
        self.max_seq_len = cfg.model.max_seq_len
        self.pipeline: PrefetchPipeline | None = None
        if model.indexer is not None:
            self.pipeline = PrefetchPipeline(
                model,
                source or LocalRowSource(model),
                prefetch=cfg.worker.prefetch,
                cache=build_cache(model, cfg, self.device),
                timeout_s=cfg.cluster.lookup_timeout_s,
            )
        self.batches = 0
        self.sequences = 0

    @torch.inference_mode()
    def logprobs(self, batch: list[Work]) -> list[torch.Tensor]:
        """-> per item: (V,) next-token log-probs, or (T, V) at every position (CPU, fp32; V = tokenizer ids)."""
        lengths = [len(w.ids) for w in batch]
        assert 0 < max(lengths) <= self.max_seq_len and min(lengths) > 0
        ids = torch.full((len(batch), max(lengths)), self.pad_id, dtype=torch.long)  # (B, T) right-padded
        for i, w in enumerate(batch):
            ids[i, : len(w.ids)] = torch.tensor(w.ids, dtype=torch.long)
        ids_dev = to_device(ids, self.device)
        if self.pipeline is not None:
            # the rows are asked for here, as this forward starts: they overlap blocks 0..l-1 only
            # (prefetching the next batch during this one is the batcher's job, issue 11)
            logits, _ = self.pipeline.forward(ids_dev, ids_cpu=ids)  # (B, T, V)
        else:
            logits, _ = self.model(ids_dev, ids_cpu=ids)
        logp = torch.log_softmax(logits[..., : self.num_tokens].float(), dim=-1)  # (B, T, V_tok)
        self.batches += 1
        self.sequences += len(batch)
        out = []
        for i, (w, n) in enumerate(zip(batch, lengths)):
            out.append((logp[i, n - 1] if w.last_only else logp[i, :n]).cpu())
        return out

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


def sample_next(
    logp_V: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> int:
    """One token from next-token log-probs (V,)."""
    if temperature == 0:
        return int(torch.argmax(logp_V))
    scores = logp_V / temperature  # (V,)
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


Runner = Callable[[list[Work]], list[torch.Tensor]]
