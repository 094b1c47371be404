"""Numeric precision on CUDA: bf16 autocast and TF32 matmuls, from `train.autocast`/`train.tf32`.

Both apply to CUDA only: a CPU run stays in fp32 IEEE arithmetic, so its results do not
depend on these settings. The residual stream, the loss and every parameter (tables
included) stay fp32 under autocast; bf16 needs no loss scaling.
"""

from __future__ import annotations

import contextlib
from typing import get_args

import torch

from engram.config_schema import Autocast

AUTOCAST_MODES: tuple[str, ...] = get_args(Autocast)  # the config's enumeration, not a second list


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for a forward pass on `device` (a no-op off CUDA or with mode "off")."""
    if mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast mode: unknown {mode!r} ({' or '.join(AUTOCAST_MODES)})")
    if device.type != "cuda" or mode == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def configure_tf32(device: torch.device | str, enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions (process-wide); does nothing off CUDA."""
    if torch.device(device).type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"  # type: ignore[attr-defined]
    else:  # pragma: no cover - older CUDA images
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
