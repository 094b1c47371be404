"""The lookup hot path: rows weights[pos] packed in the wire dtype.

One gather and one conversion pass: for bf16/fp16 the fp32 rows are gathered in chunks into
a small per-thread scratch buffer that stays in cache and converted straight into the output,
so the full-size fp32 intermediate is never written to memory. The only other copy is the
final `tobytes()` that protobuf needs.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from proto.shard.v1 import shard_pb2
from services.wire import TORCH_DTYPES

_CHUNK_BYTES = 256 << 10  # fp32 scratch per chunk, sized for L2
_scratch = threading.local()


def _scratch_buffer(rows: int, dim: int) -> torch.Tensor:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[1] != dim or buf.shape[0] < rows:
        buf = _scratch.buf = torch.empty((rows, dim), dtype=torch.float32)
    return buf


def gather_rows(weights: torch.Tensor, pos: np.ndarray, dtype: int) -> bytes:
    """weights (R, D) fp32, pos (n,) int64 positions -> bytes of (n, D) rows in wire `dtype`."""
    n, dim = pos.shape[0], weights.shape[1]
    idx = torch.from_numpy(pos)
    out = torch.empty((n, dim), dtype=TORCH_DTYPES[dtype])  # (n, D) wire dtype
    if dtype == shard_pb2.FP32:
        torch.index_select(weights, 0, idx, out=out)
    else:
        chunk = max(64, _CHUNK_BYTES // (4 * dim))
        scratch = _scratch_buffer(chunk, dim)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            tmp = scratch[: b - a]  # (c, D) fp32
            torch.index_select(weights, 0, idx[a:b], out=tmp)
            out[a:b].copy_(tmp)
    if out.dtype == torch.bfloat16:
        out = out.view(torch.int16)  # numpy has no bf16; the bytes are the same
    return out.numpy().tobytes()
