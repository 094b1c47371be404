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


def lazy_adam_(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor, step: int, p: AdamParams) -> None:
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


class SparseRowAdam(torch.optim.Optimizer):
    """torch.optim.Optimizer over embedding tables with sparse gradients, using `lazy_adam_`.

    The local trainer uses it so that local tables and shard-held tables run the very same
    update code. No weight decay (the paper trains Engram embeddings without it).
    """

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):  # type: ignore[no-untyped-def]
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def,override]
        for group in self.param_groups:
            p_adam = AdamParams(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("SparseRowAdam expects sparse gradients (F.embedding(..., sparse=True))")
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()  # (U,), (U, D)
                if rows.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                w, m, v = (
                    p.index_select(0, rows),
                    state["exp_avg"].index_select(0, rows),
                    state["exp_avg_sq"].index_select(0, rows),
                )
                lazy_adam_(w, m, v, g=values, step=state["step"], p=p_adam)
                p.index_copy_(0, rows, w)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
        return None
