"""The pieces of a gradient push: checked gradients, optimizer parameters, one shard's request.

`push_request` builds the ApplyGradientsRequest of one shard's part of a step, for the R=1
fan-out by owner (services/client/push.py), the fan-out to every holder of a replicated slot
(services/client/replicas.py) and the empty parts that complete a half-collected step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from proto.shard.v1 import shard_pb2


def push_request(
    *,
    table: int,
    epoch: int,
    ids: np.ndarray,
    grads: torch.Tensor,
    step: int,
    opt: shard_pb2.OptimizerParams,
    part_id: str = "",
    num_parts: int = 0,
    max_staleness: int = 0,
) -> shard_pb2.ApplyGradientsRequest:
    """(n,) int64 row ids and (n, D) fp32 grads -> the request for one shard (n may be 0)."""
    return shard_pb2.ApplyGradientsRequest(
        table=table,
        epoch=epoch,
        row_ids=ids.astype("<i8").tobytes(),
        grads=grads.numpy().tobytes(),
        step=step,
        optimizer=opt,
        part_id=part_id,
        num_parts=num_parts,
        max_staleness=max_staleness,
    )


def optimizer_params(optimizer: Any) -> shard_pb2.OptimizerParams:
    if isinstance(optimizer, shard_pb2.OptimizerParams):
        return optimizer
    if isinstance(optimizer, dict):
        try:
            return shard_pb2.OptimizerParams(**optimizer)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"optimizer: {exc} (fields: kind, lr, beta1, beta2, eps, version)") from None
    raise ValueError(f"optimizer: expected OptimizerParams or a dict, got {type(optimizer).__name__}")


def checked_grads(grads: Any, *, n: int, dim: int, table: int) -> torch.Tensor:
    """-> (n, D) fp32 contiguous CPU gradients, refused if the shape is wrong or a value is not finite."""
    g = torch.as_tensor(grads).detach().to(device="cpu", dtype=torch.float32).contiguous()
    if tuple(g.shape) != (n, dim):
        raise ValueError(f"grads: shape {tuple(g.shape)}, expected ({n}, {dim}) for {n} rows of table {table}")
    if n and not bool(torch.isfinite(g).all()):
        bad = torch.nonzero(~torch.isfinite(g).all(dim=1)).flatten()
        raise ValueError(f"grads: {bad.numel()} rows hold NaN/Inf (first: row index {int(bad[0])})")
    return g
