"""The same training run twice with 2 CPU threads gives bit-identical losses and weights, and
equals a 1-thread run in torch's deterministic mode.

The batch is large enough (B*T*Hn*dh = 16*64*8*16 = 131k row elements per Engram layer) for
torch's CPU kernels to split work across threads: the old `rows[inverse]` expansion, whose
backward is index_put_(accumulate=True) with unordered float atomics, fails this test.
"""

from __future__ import annotations

import pytest
import torch

from engram.checkpoint import load_model
from engram.config import load_config
from engram.data import prepare_data
from tests.corpus import write_code_corpus
from trainer.local import train_local

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    write_code_corpus(root / "corpus.txt")
    cfg = load_config(
        "tiny",
        None,
        [
            f'train.corpus=["{root / "corpus.txt"}"]',
            f"tokenizer.cache_dir={root / 'cache'}",
            "train.progress=false",
            "train.batch_size=16",
            "train.seq_len=64",
            "train.steps=4",
            "train.eval_every=2",
            "engram.n_head_per_ngram=4",
            "engram.n_embed_per_ngram=64",
            "engram.table_size_per_ngram=[997,997]",
        ],
    )
    return root, cfg, prepare_data(cfg)


def train(
    setup, name: str, *, threads: int = 2, deterministic: bool = False
) -> tuple[list[float], list, dict[str, torch.Tensor]]:
    root, cfg, data = setup
    cfg.train.out_dir = str(root / name)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    try:
        result = train_local(cfg, data=data)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(before)
    model, _, _ = load_model(result.checkpoint)
    return result.train_losses, result.val_losses, model.state_dict()


def assert_identical(a, b) -> None:
    losses_a, val_a, state_a = a
    losses_b, val_b, state_b = b
    assert losses_a == losses_b  # bit-identical floats, every step
    assert val_a == val_b
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_two_thread_runs_are_bit_identical_and_equal_one_deterministic_thread(setup) -> None:
    first, second = train(setup, "a"), train(setup, "b")
    assert len(first[0]) == 4 and first[0][-1] < first[0][0]  # it trained
    assert any(k.startswith("tables.") for k in first[2])  # tables are compared too
    assert_identical(first, second)
    # every op of the step has a deterministic kernel (deterministic mode raises otherwise), and
    # the default 2-thread kernels compute exactly what 1 thread in deterministic mode computes
    assert_identical(first, train(setup, "strict", threads=1, deterministic=True))
