"""Rows as they travel -> rows to compute with: fp8 (E4M3 values + UE8M0 block scales) to bf16.

A lookup in the fp8 wire format lands as (U, D + D/32) raw bytes (services/wire.py); the
client turns them into (U, D) values here, on the device the caller names: the bytes are
copied to the GPU first (264 instead of 512 bytes a row for D = 256) and dequantised there.
The float wire formats pass through (moved to the device if one is named).
"""

from __future__ import annotations

import torch

from engram.row_format import dequantize_fp8


def wire_to_values(
    rows: torch.Tensor,
    *,
    dim: int,
    fp8: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """rows (U, D) floats or (U, D + D/32) fp8 bytes -> (U, D) on `device` (default: where they are).

    `dtype`: the result's dtype; None keeps a float wire's dtype and gives bf16 for fp8.
    """
    if device is not None:
        rows = rows.to(device, non_blocking=rows.is_pinned())
    if not fp8:
        return rows if dtype is None else rows.to(dtype)
    if rows.ndim != 2 or rows.shape[1] != dim + dim // 32 or rows.dtype != torch.uint8:
        raise ValueError(f"fp8 rows: expected (U, {dim + dim // 32}) uint8, got {tuple(rows.shape)} {rows.dtype}")
    return dequantize_fp8(rows[:, :dim], rows[:, dim:], dtype or torch.bfloat16)  # (U, D)
