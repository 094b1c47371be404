"""A table's storage format on a shard (engram.row_format) and what follows from it.

    fp32   (R, D) float32   the trainable master rows (optionally mirrored narrow, shm_table.py)
    bf16   (R, D) bfloat16  trainable: the optimizer computes in fp32 and rounds back on write
    fp16   (R, D) float16   likewise
    fp8    (R, D + D/32) uint8   E4M3 values then one UE8M0 scale per 32 values, side by side
                                 (264 bytes for D = 256); read-only: no optimizer state, no pushes

A lookup may ask for any wire format whose row is not wider than the storage row
(engram.row_format.check_wire_format): fp8 storage serves only fp8; fp32 storage serves every
format, quantising to fp8 on the shard when asked. Non-fp32 tables live in private memory
(the shared-memory row path maps fp32 rows and their mirror only; clients use TCP for them).
"""

from __future__ import annotations

import numpy as np
import torch

from engram.row_format import FORMATS, FP8_BLOCK, encode_rows, quantize_fp8_torch, row_nbytes
from proto.shard.v1 import shard_pb2
from services.shard.errors import Reason, invalid, precondition
from services.wire import FORMAT_OF, ROW_DTYPES

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.uint8,
}
READ_ONLY = ("fp8",)
FP8_NAME = "fp8 (E4M3 values + UE8M0 block-32 scales)"


def storage_cols(fmt: str, dim: int) -> int:
    """Elements of one stored row: dim, or its dim + dim/32 bytes for fp8."""
    return row_nbytes(fmt, dim) if fmt == "fp8" else dim


def read_only(fmt: str) -> bool:
    return fmt in READ_ONLY


def alloc_rows(fmt: str, rows: int, dim: int) -> torch.Tensor:
    """(R, storage_cols) uninitialised rows of a non-fp32 table (fp32 goes through TableMemory)."""
    return torch.empty((rows, storage_cols(fmt, dim)), dtype=STORAGE_DTYPES[fmt])


def encode_init(fmt: str, block: np.ndarray) -> torch.Tensor:
    """(n, D) float32 initial rows -> (n, storage_cols) in the storage format."""
    if fmt == "fp32":
        return torch.from_numpy(block)
    return torch.from_numpy(encode_rows(block, fmt)).view(STORAGE_DTYPES[fmt])


def describe(fmt: str) -> str:
    return FP8_NAME if fmt == "fp8" else fmt


def wire_name(dtype: int) -> str:
    return shard_pb2.WireDtype.Name(dtype) if dtype in shard_pb2.WireDtype.values() else str(dtype)


def check_lookup_dtype(fmt: str, dtype: int, *, dim: int, table: int) -> None:
    """Refuse a wire dtype that is unknown or wider than the table's storage row."""
    wire = FORMAT_OF.get(dtype)
    if wire is None:
        raise invalid(f"dtype: {wire_name(dtype)} is not a wire dtype (FP32, BF16, FP16 or FP8_E4M3_UE8M0)")
    if wire == "fp8" and dim % FP8_BLOCK:
        raise invalid(f"dtype: FP8_E4M3_UE8M0 needs rows of a multiple of {FP8_BLOCK} values; table {table} has {dim}")
    if row_nbytes(wire, dim) > row_nbytes(fmt, dim):
        raise invalid(
            f"dtype: {wire_name(dtype)} ({row_nbytes(wire, dim)} bytes/row) is wider than table {table}'s storage "
            f"format {describe(fmt)} ({row_nbytes(fmt, dim)} bytes/row); ask for "
            + ", ".join(
                f
                for f in FORMATS
                if (f != "fp8" or dim % FP8_BLOCK == 0) and row_nbytes(f, dim) <= row_nbytes(fmt, dim)
            )
        )


def refuse_write(fmt: str, table: int, what: str) -> None:
    """Raise FAILED_PRECONDITION when `what` would write rows of a read-only table."""
    if read_only(fmt):
        raise precondition(
            f"{what}: table {table} is stored as {describe(fmt)}, which is read-only (no optimizer state; "
            "serve it, or train an fp32 copy: engram.row_format=fp32)",
            Reason.READ_ONLY_TABLE,
        )


def convert_into(src: torch.Tensor, out: torch.Tensor) -> None:
    """out (c, wire cols) <- src (c, storage cols) rows of another format (never a wider one).

    float -> float casts; float -> fp8 quantises (values then scales per row, DeepGEMM's ue8m0 rule).
    """
    if out.dtype == torch.uint8:
        assert src.dtype != torch.uint8, "fp8 rows are copied, not converted"
        dim = src.shape[1]
        values, scales = quantize_fp8_torch(src)  # (c, D), (c, D/32) uint8
        out[:, :dim] = values
        out[:, dim:] = scales
    else:
        assert src.dtype != torch.uint8, "an fp8 table serves fp8 rows only"
        out.copy_(src)


assert set(ROW_DTYPES.values()) >= set(STORAGE_DTYPES.values())
