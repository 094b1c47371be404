"""Pieces of a training step shared by the local trainer and the Ray trainer."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from engram.config import TrainConfig
from engram.engram_layer import ShortConv
from engram.model import EngramLM
from engram.row_optim import SparseRowAdam


@dataclass
class StepOut:
    """What one optimizer step reports to the training loop (trainer.loop)."""

    loss: float | torch.Tensor  # mean loss over the global batch (a device tensor: read later, in bulk)
    tokens: int  # tokens of the global batch
    staleness: int = 0  # steps of updates the rows of this step missed (remote rows, async)
    lr: float = 0.0  # the backbone's learning rate of this step
    lookup_s: float = 0.0  # blocked: waiting for this step's rows
    compute_s: float = 0.0
    push_s: float = 0.0  # blocked: waiting for this step's push to be answered (sync)
    reread_rows: int = 0  # rows of the prefetch read again because the previous step updated them

    @property
    def blocked_s(self) -> float:
        return self.lookup_s + self.push_s


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 10%; `step` is 0-based."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def local_slice(x: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rows [rank * B/world, (rank+1) * B/world) of a (B, ...) global batch: data-parallel worker
    `rank`'s share, and the local trainer's micro-batch `rank` under gradient accumulation."""
    b = x.shape[0] // world
    return x[rank * b : (rank + 1) * b]


def build_optimizers(model: EngramLM, cfg: TrainConfig) -> tuple[torch.optim.AdamW, SparseRowAdam | None]:
    """AdamW for the backbone (decay on matrices only); lazy Adam at engram_lr_mult x LR, no decay, for tables."""
    dense = model.dense_parameters()
    decay = [p for p in dense if p.dim() >= 2]
    no_decay = [p for p in dense if p.dim() < 2]
    backbone = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    tables = [p for p in model.tables.parameters() if p.requires_grad]  # none when engram.freeze_table
    engram = SparseRowAdam(tables, lr=cfg.lr * cfg.engram_lr_mult) if tables else None
    return backbone, engram


def set_lr(step: int, cfg: TrainConfig, *optimizers: torch.optim.Optimizer | None) -> float:
    factor = lr_factor(step, cfg)
    for opt in optimizers:
        if opt is None:
            continue
        base = cfg.lr * (cfg.engram_lr_mult if isinstance(opt, SparseRowAdam) else 1.0)
        for group in opt.param_groups:
            group["lr"] = base * factor
    return cfg.lr * factor


@torch.no_grad()
def evaluate(model: EngramLM, batches: Iterable[tuple[np.ndarray, np.ndarray]], device: str) -> float:
    """Mean cross-entropy over fixed validation windows."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        _, loss = model(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        losses.append(float(loss))
    model.train(was_training)
    return float(np.mean(losses))


def step_flops(model: EngramLM, *, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward).

    Dense weights cost 2 FLOPs per parameter per token; attention scores cost 2 * 2 * T * D
    per token per layer (QK^T and AV, halved by the causal mask). Table lookups are gathers: 0.
    """
    cfg = model.cfg.model
    table_ids = {id(p) for p in model.tables.parameters()}
    matmul_params = sum(
        p.numel()
        for name, p in model.named_parameters()
        if id(p) not in table_ids and p.dim() >= 2 and "tok_emb" not in name
    )
    if cfg.tie_embeddings:
        matmul_params += model.lm_head.weight.numel()
    conv = sum(m.conv.weight.numel() for m in model.modules() if isinstance(m, ShortConv))  # none with short_conv off
    tokens = batch_size * seq_len
    per_token = 2 * (matmul_params - conv) + 2 * conv + 2 * cfg.n_layer * seq_len * cfg.d_model
    return 3.0 * per_token * tokens
