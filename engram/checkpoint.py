"""The checkpoint format: model, optimizers, config and tokenizer in one file, written atomically.

Below both its writers (trainer/) and its readers (worker/, benchmarks): files only, no network.
Tensors and plain data only, read back with torch.load(weights_only=True) (engram/torch_io.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.config import Config, config_from_dict
from engram.fileio import atomic_open
from engram.model import EngramLM
from engram.torch_io import load_checkpoint_file


def atomic_torch_save(obj: Any, path: Path) -> None:
    """write tmp -> fsync -> rename -> fsync dir: a crash leaves the old file or the new one."""
    with atomic_open(path, durable=True) as f:
        torch.save(obj, f)


def save_checkpoint(
    path: Path,
    *,
    model: EngramLM,
    optimizers: tuple,
    step: int,
    cfg: Config,
    compress_lookup: np.ndarray,
    tokenizer_json: str,
    history: dict,
) -> None:
    atomic_torch_save(
        {
            "step": step,
            "config": cfg.to_dict(),
            "model": model.state_dict(),
            "optimizers": [opt.state_dict() if opt is not None else None for opt in optimizers],
            "compress_lookup": torch.from_numpy(np.array(compress_lookup, dtype=np.int64)),
            "tokenizer_json": tokenizer_json,
            "history": history,
        },
        path,
    )


def load_checkpoint(path: Path, model: EngramLM, *optimizers) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    state = load_checkpoint_file(path)
    model.load_state_dict(state["model"])
    for opt, opt_state in zip(optimizers, state["optimizers"]):
        if opt is not None and opt_state is not None:
            opt.load_state_dict(opt_state)
    return int(state["step"]), state["history"]


def load_model(path: str | Path, device: str = "cpu") -> tuple[EngramLM, Config, str]:
    """A trained model for inference: (model, config, tokenizer json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = load_checkpoint_file(path)
    cfg = config_from_dict(state["config"])
    model = EngramLM(cfg, state["compress_lookup"].numpy() if cfg.engram.enabled else None)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, state["tokenizer_json"]
