from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import tiny
from engram.engram_layer import EngramRows
from engram.model import EngramLM


def make(hc_mult: int = 1, **engram) -> EngramLM:
    cfg = tiny()
    cfg.model.hc_mult = hc_mult
    for k, v in engram.items():
        setattr(cfg.engram, k, v)
    torch.manual_seed(0)
    return EngramLM(cfg, np.arange(cfg.model.vocab_size) // 3)  # a 3-to-1 compression map


def ids(B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("hc_mult", [1, 3])
def test_forward_shapes_and_gates(hc_mult: int) -> None:
    model = make(hc_mult)
    x = ids()
    logits, loss, gates = model(x, x, return_gates=True)
    assert logits.shape == (2, 16, 512) and loss.ndim == 0 and torch.isfinite(loss)
    assert set(gates) == {1} and gates[1].shape == (2, 16, hc_mult)
    assert ((gates[1] > 0) & (gates[1] < 1)).all()


def test_remote_rows_seam_equals_local_table() -> None:
    """Rows handed in from outside (as shards return them) give the same logits, and their gradient
    equals the local table's sparse gradient on the touched rows: the trainer pushes exactly this."""
    model = make()
    x = ids()
    logits_local, loss_local = model(x, x)
    loss_local.backward()
    table_grad = model.tables["1"].weight.grad.coalesce()

    model.zero_grad()
    indices = model.engram_indices(x)
    unique, inverse = indices[1]
    rows = model.tables["1"].weight.detach()[unique].clone().requires_grad_(True)  # what a shard would send
    logits_remote, loss_remote = model(x, x, engram_rows={1: EngramRows(rows=rows, inverse=inverse)})
    loss_remote.backward()
    assert torch.equal(logits_local, logits_remote)
    assert torch.equal(table_grad.indices()[0], unique)
    torch.testing.assert_close(rows.grad, table_grad.values(), rtol=0, atol=0)


def test_causal() -> None:
    """Changing a future token must not change earlier logits (attention, conv and hashing are causal)."""
    model = make()
    x = ids(1, 16)
    y = x.clone()
    y[0, 10] = (y[0, 10] + 7) % 512
    a, _ = model(x)
    b, _ = model(y)
    assert torch.equal(a[0, :10], b[0, :10])
    assert not torch.equal(a[0, 10:], b[0, 10:])


def test_baseline_has_no_tables_and_engram_starts_as_gated_value() -> None:
    cfg = tiny()
    cfg.engram.enabled = False
    base = EngramLM(cfg)
    assert len(base.tables) == 0 and base.indexer is None
    model = make()
    conv = model.blocks[1].engram.short_conv.conv.weight
    assert torch.count_nonzero(conv) == 0  # zero-init conv, as in the paper


def test_input_errors() -> None:
    model = make()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros((1, 65), dtype=torch.long))
    with pytest.raises(ValueError, match="input ids"):
        model(torch.full((1, 4), 600, dtype=torch.long))
    cfg = tiny()
    with pytest.raises(ValueError, match="compress_lookup"):
        EngramLM(cfg, None)
