"""The premise of sync mode, without Ray or shards: a global batch split over W workers, with
dense gradients averaged (DDP) and each worker's row gradients divided by W and summed (the
shards), trains the same model as the whole batch in one process.

It also pins down why the equivalence tests use train.seed=3: with the demo's signed-sqrt gate,
a token whose gate pre-activation |g| lands near 0 (seed 1234, step 12: |g| = 6e-5) makes the
float rounding of the split alone grow to > 1e-4 in the loss a few steps later.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.data import prepare_data
from engram.model import EngramLM
from tests.corpus import write_code_corpus
from trainer.step import build_optimizers, set_lr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    write_code_corpus(root / "corpus.txt")
    return root


def max_rel_loss_gap(root, seed: int, world: int = 2, steps: int = 20) -> float:
    cfg = load_config("tiny", None, [f"train.corpus=[\"{root / 'corpus.txt'}\"]", f"tokenizer.cache_dir={root / 'c'}",
                                     f"train.seed={seed}", f"train.steps={steps}"])
    t = cfg.train
    _, vocab, ds = prepare_data(cfg)

    def make():  # type: ignore[no-untyped-def]
        torch.manual_seed(t.seed)
        m = EngramLM(cfg, vocab.lookup)
        return (m, *build_optimizers(m, t))

    whole, split = make(), make()
    rng = np.random.default_rng(t.seed)
    gap = 0.0
    for step in range(t.steps):
        x, y = (torch.from_numpy(a) for a in ds.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng))
        m, bo, eo = whole
        set_lr(step, t, bo, eo)
        _, loss = m(x, y)
        bo.zero_grad(set_to_none=True)
        eo.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.dense_parameters(), t.grad_clip)
        bo.step()
        eo.step()
        m, bo, eo = split
        set_lr(step, t, bo, eo)
        b = t.batch_size // world
        parts, losses = [], []
        for r in range(world):  # each "worker": its slice, its own mean loss
            m.zero_grad(set_to_none=True)
            _, part_loss = m(x[r * b : (r + 1) * b], y[r * b : (r + 1) * b])
            part_loss.backward()
            losses.append(part_loss.item())
            parts.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        for n, p in m.named_parameters():
            if n in parts[0]:
                gs = [part[n] for part in parts]
                if gs[0].is_sparse:  # rows: each part / W, summed by the shard
                    total = gs[0] / world
                    for g in gs[1:]:
                        total = total + g / world
                    p.grad = total.coalesce()
                else:  # dense: DDP's mean
                    p.grad = torch.stack(gs).sum(0) / world
        torch.nn.utils.clip_grad_norm_(m.dense_parameters(), t.grad_clip)
        bo.step()
        eo.step()
        gap = max(gap, abs(loss.item() - float(np.mean(losses))) / loss.item())
    return gap


def test_split_batch_equals_whole_batch(corpus) -> None:
    assert max_rel_loss_gap(corpus, seed=3) < 1e-5


def test_signed_sqrt_gate_amplifies_rounding_for_an_unlucky_seed(corpus) -> None:
    """Documents the model's sensitivity (not a trainer bug): same math, another seed."""
    assert max_rel_loss_gap(corpus, seed=1234) > 1e-4
