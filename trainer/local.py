"""Single-process training: the reference the distributed trainer must equal in sync mode."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from engram.checkpoint import load_checkpoint, save_checkpoint
from engram.config import Config
from engram.data import TokenDataset, prepare_data
from engram.model import EngramLM
from engram.precision import configure_tf32
from trainer.plots import plot_loss_curves
from trainer.step import build_optimizers, evaluate, local_slice, set_lr, step_flops

LOSS_READ_EVERY = 10  # steps between reads of the training loss (each read waits for the GPU)


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


def train_local(
    cfg: Config, *, data: tuple | None = None, resume: bool = False, label: str | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Train `cfg` on its corpus; `data` = prepare_data(cfg) result, to share between runs.

    `stop_at` ends the run early (after that step's checkpoint), as if the process were killed.
    """
    t = cfg.train
    torch.manual_seed(t.seed)
    tokenizer, vocab, dataset = data if data is not None else prepare_data(cfg)
    dataset: TokenDataset
    model = EngramLM(cfg, vocab.lookup if cfg.engram.enabled else None).to(t.device)
    configure_tf32(t.device, t.tf32)
    backbone_opt, engram_opt = build_optimizers(model, t)
    out = Path(t.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = TrainResult(final_val_loss=float("nan"), compression_ratio=vocab.ratio)
    start_step = 0
    ckpt_path = out / "checkpoint.pt"
    if resume and ckpt_path.exists():
        start_step, history = load_checkpoint(ckpt_path, model, backbone_opt, engram_opt)
        result.train_losses, result.val_losses = history["train_losses"], [tuple(v) for v in history["val_losses"]]
    rng = np.random.default_rng(t.seed)
    for _ in range(start_step):  # replay the sampler so a resumed run sees the same batches
        dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng)
    eval_batches = list(dataset.iter_eval_batches("val", batch_size=t.batch_size, seq_len=t.seq_len, num_batches=t.eval_batches))
    result.step_flops = step_flops(model, batch_size=t.batch_size, seq_len=t.seq_len)

    pending: list[torch.Tensor] = []  # per-step losses still on the device

    def read_losses() -> None:
        """One device -> host read for the steps since the last: the CPU runs ahead in between."""
        if pending:
            result.train_losses.extend(torch.stack(pending).tolist())
            pending.clear()

    def checkpoint(step: int) -> None:
        read_losses()
        history = {"train_losses": result.train_losses, "val_losses": result.val_losses}
        save_checkpoint(ckpt_path, model=model, optimizers=(backbone_opt, engram_opt), step=step, cfg=cfg,
                        compress_lookup=vocab.lookup, tokenizer_json=tokenizer.to_str(), history=history)

    bar = tqdm(range(start_step, t.steps), disable=not t.progress, desc=label or "train", dynamic_ncols=True)
    tokens, t0 = 0, time.perf_counter()
    model.train()
    for step in bar:
        lr = set_lr(step, t, backbone_opt, engram_opt)
        x, y = dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng)
        backbone_opt.zero_grad(set_to_none=True)
        if engram_opt is not None:
            engram_opt.zero_grad(set_to_none=True)
        loss = accumulate_grads(model, x, y, micro_batches=t.grad_accum, device=t.device)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.dense_parameters(), t.grad_clip)
        backbone_opt.step()
        if engram_opt is not None:
            engram_opt.step()
        pending.append(loss.detach())
        tokens += x.size
        done = step + 1
        if done % LOSS_READ_EVERY == 0 or done == t.steps or (stop_at is not None and done >= stop_at):
            read_losses()
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}", lr=f"{lr:.1e}",
                            tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")
        if done % t.eval_every == 0 or done == t.steps:
            result.val_losses.append((done, evaluate(model, eval_batches, t.device)))
            bar.write(f"{label or 'train'} step {done}: val loss {result.val_losses[-1][1]:.4f}")
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == t.steps:
            checkpoint(done)
        if stop_at is not None and done >= stop_at:
            break
    result.tokens_per_s = tokens / max(time.perf_counter() - t0, 1e-9)
    result.final_val_loss = result.val_losses[-1][1] if result.val_losses else float("nan")
    result.checkpoint = str(ckpt_path)
    plot_loss_curves({label or "train": result}, out / "loss.png")
    (out / "result.json").write_text(json.dumps({
        "final_val_loss": result.final_val_loss, "val_losses": result.val_losses,
        "tokens_per_s": result.tokens_per_s, "step_flops": result.step_flops,
        "compression_ratio": result.compression_ratio,
    }, indent=2))
    return result
