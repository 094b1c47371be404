"""The lookup hot path: rows weights[pos] in the wire dtype, written straight into the reply.

`encode_lookup` builds the serialized LookupResponse itself: the small fields, then the
`rows` field header, then the rows, gathered in one pass directly into the message buffer.
For bf16/fp16 the fp32 rows are gathered in chunks into a small per-thread scratch buffer
that stays in cache and converted straight into the buffer, so no full-size fp32 copy is
ever written. The buffer is the reply's `bytes` object itself (gRPC wants `bytes`; see
`new_bytes`), so the rows are written once on the shard; protobuf's own path would add four
copies (tobytes, message build, serialize, attribute access).
Fields are in a different order than protobuf writes them, which the wire format allows.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from proto.shard.v1 import shard_pb2
from services.shard.row_store_format import convert_into
from services.wire import ROW_DTYPES, row_bytes, row_cols

_CHUNK_BYTES = 1 << 20  # fp32 scratch per chunk, sized for L2
_scratch = threading.local()


@dataclass(frozen=True, slots=True)
class LookupResult:
    payload: bytes  # a serialized LookupResponse
    rows: int
    rows_nbytes: int
    epoch: int
    applied_step: int


def _bytes_writer():
    """CPython's `PyBytes_FromStringAndSize(NULL, n)`: a new bytes object to fill before use."""
    if sys.implementation.name != "cpython":
        return None
    fn = ctypes.pythonapi.PyBytes_FromStringAndSize
    fn.restype, fn.argtypes = ctypes.py_object, (ctypes.c_char_p, ctypes.c_ssize_t)
    return fn


_new_bytes = _bytes_writer()
_SVAL_OFFSET = bytes.__basicsize__ - 1  # offset of ob_sval, the payload of a bytes object


def new_bytes(n: int) -> tuple[bytes | None, memoryview]:
    """-> (a fresh bytes object of n bytes, a writable view of its contents).

    The C API contract: contents are uninitialised and may be written until the object is
    shared; it is handed to gRPC only when complete. That saves the reply's copy and page
    faults. Falls back to (None, bytearray view) elsewhere; the caller then copies.
    """
    if _new_bytes is not None and n >= 2:  # 0 and 1 may be shared singletons
        obj = _new_bytes(None, n)
        return obj, memoryview((ctypes.c_char * n).from_address(id(obj) + _SVAL_OFFSET)).cast("B")
    return None, memoryview(bytearray(n))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _scratch_buffer(rows: int, dim: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[1] != dim or buf.shape[0] < rows:
        buf = _scratch.buf = torch.empty((rows, dim), dtype=torch.float32)
    return buf


def void_rows(t: torch.Tensor) -> np.ndarray:
    """(n, D) contiguous tensor -> (n,) numpy array of opaque rows on the same memory."""
    raw = t.view(torch.uint8).numpy()  # (n, D * itemsize)
    return raw.view(np.dtype((np.void, raw.shape[1]))).reshape(t.shape[0])


def gather_into(weights: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """out (n, D) in a wire dtype <- weights (R, D) rows idx (n,): fp32 master rows, or a
    mirror of the wire dtype (then whole rows are copied, one memcpy each, in numpy)."""
    n, dim = out.shape
    if out.dtype == weights.dtype:
        if n:
            np.take(void_rows(weights), idx.numpy(), out=void_rows(out), mode="clip")  # ids checked: no buffering
        return
    if out.dtype == torch.uint8 or weights.dtype != torch.float32:  # fp8 wire, or a bf16/fp16-stored table
        step = max(64, _CHUNK_BYTES // (4 * weights.shape[1]))
        for a in range(0, n, step):
            convert_into(weights.index_select(0, idx[a : a + step]), out[a : a + step])
        return
    chunk = max(64, _CHUNK_BYTES // (4 * dim))
    scratch = _scratch_buffer(chunk, dim)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        tmp = scratch[: b - a]  # (c, D) fp32
        torch.index_select(weights, 0, idx[a:b], out=tmp)
        out[a:b].copy_(tmp)


def encode_lookup(
    weights: torch.Tensor, pos: np.ndarray, *, dtype: int, epoch: int, applied_step: int, dim: int = 0
) -> LookupResult:
    """weights (R, D) in the storage format or a mirror in `dtype`, pos (n,) int64 -> a serialized
    LookupResponse with rows weights[pos] (fp8 rows: (n, D + D/32) bytes, values then scales).
    `dim`: values per row D (required for fp8 storage, whose rows are D + D/32 bytes)."""
    n, dim = pos.shape[0], dim or weights.shape[1]
    nbytes = n * row_bytes(dtype, dim)
    wire = cast("shard_pb2.WireDtype", dtype)  # an int of the enum (proto3 enums are open)
    head = shard_pb2.LookupResponse(dim=dim, dtype=wire, epoch=epoch, applied_step=applied_step).SerializeToString()
    if nbytes:
        head += b"\x0a" + _varint(nbytes)  # field 1 (rows), length-delimited
    payload, buf = new_bytes(len(head) + nbytes)
    buf[: len(head)] = head
    if n:
        cols = row_cols(dtype, dim)
        out = torch.frombuffer(buf, dtype=ROW_DTYPES[dtype], offset=len(head), count=n * cols).view(n, cols)
        gather_into(weights, torch.from_numpy(pos), out)
    if payload is None:
        payload = bytes(buf)
    return LookupResult(payload=payload, rows=n, rows_nbytes=nbytes, epoch=epoch, applied_step=applied_step)
