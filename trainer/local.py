"""Single-process training (trainer.loop with local rows): the reference sync distributed training must equal."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from engram.checkpoint import load_checkpoint, save_checkpoint
from engram.config import Config
from engram.data import TokenDataset, prepare_data
from engram.model import EngramLM
from engram.precision import configure_tf32
from engram.row_optim import SparseRowAdam
from engram.tokenizer import CompressedVocab
from trainer.loop import Batches, LoopStats, NoSync, run_loop
from trainer.plots import plot_loss_curves
from trainer.step import StepOut, build_optimizers, evaluate, local_slice, set_lr, step_flops


@dataclass
class TrainResult:
    final_val_loss: float
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    step_flops: float = 0.0
    compression_ratio: float = 0.0
    checkpoint: str = ""


def accumulate_grads(model: EngramLM, x: np.ndarray, y: np.ndarray, *, micro_batches: int, device: str) -> torch.Tensor:
    """Backward over `micro_batches` slices of the (B, T) batch -> the batch's mean loss (detached).

    Slice r is rows [r B/W, (r+1) B/W), exactly the slice Ray worker r trains on
    (trainer.step.local_slice, as trainer.remote_step uses it), and each slice's loss is scaled by 1/W, so the summed
    gradients are DDP's mean of per-worker gradients (dense) and the shards' sum of per-worker
    gradients / W (rows). For W a power of two the scaling is exact in floating point.
    """
    total = torch.zeros((), device=device)
    for r in range(micro_batches):
        xs = torch.from_numpy(local_slice(x, r, micro_batches))  # (B/W, T); Engram indices from the CPU ids
        ys = torch.from_numpy(local_slice(y, r, micro_batches)).to(device)
        _, loss = model(xs.to(device), ys, ids_cpu=xs)
        (loss / micro_batches).backward()
        total = total + loss.detach()
    return total / micro_batches


class LocalStep:
    """The local row backend of trainer.loop: the model's own tables and lazy Adam, no gradient sync,
    `train.grad_accum` micro-batches per step (the split W Ray workers would train on)."""

    rows_remote = False

    def __init__(
        self, *, model: EngramLM, backbone_opt: torch.optim.Optimizer, engram_opt: SparseRowAdam | None, cfg: Config
    ) -> None:
        self.model, self.backbone_opt, self.engram_opt, self.t = model, backbone_opt, engram_opt, cfg.train

    def train_step(
        self, step0: int, x_BT: np.ndarray, y_BT: np.ndarray, *, next_x: np.ndarray | None = None
    ) -> StepOut:
        t0 = time.perf_counter()
        lr = set_lr(step0, self.t, self.backbone_opt, self.engram_opt)
        self.backbone_opt.zero_grad(set_to_none=True)
        if self.engram_opt is not None:
            self.engram_opt.zero_grad(set_to_none=True)
        loss = accumulate_grads(self.model, x_BT, y_BT, micro_batches=self.t.grad_accum, device=self.t.device)
        if self.t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.dense_parameters(), self.t.grad_clip)
        self.backbone_opt.step()
        if self.engram_opt is not None:
            self.engram_opt.step()
        return StepOut(loss=loss.detach(), tokens=x_BT.size, lr=lr, compute_s=time.perf_counter() - t0)

    def evaluate(self, batches: Batches, step: int) -> float:
        return evaluate(self.model, batches, self.t.device)

    def settle(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(kw_only=True)
class LocalCheckpointer:
    """<out_dir>/checkpoint.pt: model, both optimizers, config, tokenizer and the loss history."""

    path: Path
    cfg: Config
    model: EngramLM
    optimizers: tuple
    compress_lookup: np.ndarray
    tokenizer_json: str

    def save(self, stats: LoopStats, *, final: bool) -> None:
        save_checkpoint(
            self.path,
            model=self.model,
            optimizers=self.optimizers,
            step=stats.step,
            cfg=self.cfg,
            compress_lookup=self.compress_lookup,
            tokenizer_json=self.tokenizer_json,
            history=stats.history,
        )


def train_local(
    cfg: Config,
    *,
    data: tuple[Tokenizer, CompressedVocab, TokenDataset] | None = None,
    resume: bool = False,
    label: str | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train `cfg` on its corpus; `data` = prepare_data(cfg) result, to share between runs.

    `stop_at` ends the run early (after that step's checkpoint), as if the process were killed.
    """
    t = cfg.train
    torch.manual_seed(t.seed)
    tokenizer, vocab, dataset = data if data is not None else prepare_data(cfg)
    model = EngramLM(cfg, vocab.lookup if cfg.engram.enabled else None).to(t.device)
    configure_tf32(t.device, t.tf32)
    backbone_opt, engram_opt = build_optimizers(model, t)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    start, history = 0, None
    if resume and ckpt_path.exists():
        start, history = load_checkpoint(ckpt_path, model, backbone_opt, engram_opt)
        history["val_losses"] = [tuple(v) for v in history["val_losses"]]
    checkpointer = LocalCheckpointer(
        path=ckpt_path,
        cfg=cfg,
        model=model,
        optimizers=(backbone_opt, engram_opt),
        compress_lookup=vocab.lookup,
        tokenizer_json=tokenizer.to_str(),
    )
    model.train()
    stats = run_loop(
        cfg=cfg,
        backend=LocalStep(model=model, backbone_opt=backbone_opt, engram_opt=engram_opt, cfg=cfg),
        dataset=dataset,
        checkpointer=checkpointer,
        sync=NoSync(model),
        start=start,
        history=history,
        label=label or "train",
        stop_at=stop_at,
    )
    h = stats.history
    result = TrainResult(
        final_val_loss=h["val_losses"][-1][1] if h["val_losses"] else float("nan"),
        train_losses=h["train_losses"],
        val_losses=h["val_losses"],
        tokens_per_s=stats.tokens_per_s,
        compression_ratio=vocab.ratio,
        step_flops=step_flops(model, batch_size=t.batch_size, seq_len=t.seq_len),
        checkpoint=str(ckpt_path),
    )
    plot_loss_curves({label or "train": result}, out / "loss.png")
    (out / "result.json").write_text(
        json.dumps(
            {
                "final_val_loss": result.final_val_loss,
                "val_losses": result.val_losses,
                "tokens_per_s": result.tokens_per_s,
                "step_flops": result.step_flops,
                "compression_ratio": result.compression_ratio,
            },
            indent=2,
        )
    )
    return result
