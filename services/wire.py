"""Packing of row ids and rows into protobuf `bytes` fields (little-endian, no copies where possible)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch

from engram.row_format import FP8_BLOCK
from proto.shard.v1 import shard_pb2

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts are not supported"

FP8 = 4  # shard_pb2.FP8_E4M3_UE8M0: values + block scales, [n, dim + dim/32] uint8 (engram/row_format.py)
WIRE_DTYPES: dict[str, int] = {"fp32": shard_pb2.FP32, "bf16": shard_pb2.BF16, "fp16": shard_pb2.FP16, "fp8": FP8}
FORMAT_OF: dict[int, str] = {v: k for k, v in WIRE_DTYPES.items()}  # wire enum -> engram.row_format name
TORCH_DTYPES: dict[int, torch.dtype] = {
    shard_pb2.FP32: torch.float32,
    shard_pb2.BF16: torch.bfloat16,
    shard_pb2.FP16: torch.float16,
}
# Rows are unpacked as read-only views of the received message; consumers copy before writing.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

ITEMSIZE: dict[int, int] = {shard_pb2.FP32: 4, shard_pb2.BF16: 2, shard_pb2.FP16: 2}  # the float formats
# every wire dtype: the torch dtype of one element of a row as it travels (fp8 rows are raw bytes)
ROW_DTYPES: dict[int, torch.dtype] = {**TORCH_DTYPES, FP8: torch.uint8}


def row_cols(dtype: int, dim: int) -> int:
    """Elements of one `dim`-value row on the wire: dim, or dim + dim/32 bytes for fp8."""
    return dim + dim // FP8_BLOCK if dtype == FP8 else dim


def row_bytes(dtype: int, dim: int) -> int:
    """Bytes of one `dim`-value row on the wire (0 for an unknown dtype enum)."""
    if dtype == FP8:
        return dim + dim // FP8_BLOCK
    return ITEMSIZE.get(dtype, 0) * dim


class WireError(ValueError):
    """A message's packed payload is malformed; the text says how."""


def wire_dtype(name: str) -> int:
    try:
        return WIRE_DTYPES[name]
    except KeyError:
        raise WireError(f"unknown wire dtype {name!r} (fp32, bf16, fp16 or fp8)") from None


def pack_ids(ids: np.ndarray | torch.Tensor) -> bytes:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()


def unpack_ids(data: bytes, *, field: str = "row_ids") -> np.ndarray:
    """bytes -> (n,) int64 (read-only view of the message buffer)."""
    if len(data) % 8:
        raise WireError(f"{field}: {len(data)} bytes is not a whole number of int64 ids")
    return np.frombuffer(data, dtype="<i8")


def pack_rows(rows: torch.Tensor, dtype: int) -> bytes:
    """(n, dim) float tensor -> bytes in the wire dtype."""
    if dtype not in TORCH_DTYPES:
        raise WireError(f"dtype: unknown wire dtype enum {dtype}")
    out = rows.detach().to(device="cpu", dtype=TORCH_DTYPES[dtype]).contiguous()
    if out.dtype == torch.bfloat16:
        out = out.view(torch.int16)
    return out.numpy().tobytes()


def unpack_rows(data: bytes, dtype: int, dim: int, *, field: str = "rows") -> torch.Tensor:
    """bytes -> (n, dim) tensor of the wire dtype (shares the buffer; copy before writing)."""
    if dtype not in TORCH_DTYPES:
        raise WireError(f"dtype: unknown wire dtype enum {dtype}")
    row_bytes = ITEMSIZE[dtype] * dim
    if dim <= 0 or len(data) % row_bytes:
        raise WireError(f"{field}: {len(data)} bytes is not a whole number of {dim}-dim rows")
    if not data:
        return torch.empty((0, dim), dtype=TORCH_DTYPES[dtype])
    flat = torch.frombuffer(data, dtype=TORCH_DTYPES[dtype])
    return flat.view(-1, dim)
