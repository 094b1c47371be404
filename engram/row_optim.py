"""Row-wise optimizers for embedding tables, shared by the local trainer and the shards.

Both operate on gathered row blocks: the caller gathers (weights, state) of the unique
touched rows, calls the update, and scatters back. Keeping one implementation is what
makes sync-mode distributed training equal single-process training.

`lazy_adam_` reproduces torch.optim.SparseAdam (same op order): only touched rows' moments
move; bias correction uses the table's global step count.
`rowwise_adagrad_` keeps one accumulator per row (mean of squared gradient over dims).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AdamParams:
    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@dataclass(frozen=True, slots=True)
class AdagradParams:
    lr: float
    eps: float = 1e-10
    initial_accumulator: float = 0.0


def lazy_adam_(
    w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, step: int, p: AdamParams
) -> None:
    """In place on (U, D) blocks w, m, v given summed gradient g (U, D); `step` is 1-based."""
    if step < 1:
        raise ValueError(f"step: must be >= 1, got {step}")
    m_old, v_old = m.clone(), v.clone()
    m_update = g.sub(m_old).mul_(1 - p.beta1)
    m.add_(m_update)
    v_update = g.pow(2).sub_(v_old).mul_(1 - p.beta2)
    v.add_(v_update)
    numer = m_update.add_(m_old)  # new m, rounded exactly as SparseAdam rounds it
    denom = v_update.add_(v_old).sqrt_().add_(p.eps)
    step_size = p.lr * math.sqrt(1 - p.beta2**step) / (1 - p.beta1**step)
    w.add_(-step_size * numer.div_(denom))


def rowwise_adagrad_(w: torch.Tensor, acc: torch.Tensor, g: torch.Tensor, *, p: AdagradParams) -> None:
    """In place on (U, D) block w and (U,) accumulator acc."""
    acc.add_(g.pow(2).mean(dim=1))
    w.addcdiv_(g, acc.sqrt().add_(p.eps).unsqueeze(1), value=-p.lr)
