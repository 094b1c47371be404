"""The lookup benchmark's baselines and timing helpers (benchmarks/lookup.py runs them).

Batches of distinct random rows, p50/p99 summaries, and the two baselines the shards are compared
with in the same run: the in-process numpy gather and Redis MGET (one key per row), plus the
client's dedup check on the same ids.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

ITEMSIZE = {"bf16": 2, "fp32": 4}


class Batches:
    """Batches of B distinct rows: windows of one random permutation at random offsets."""

    def __init__(self, num_rows: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.perm = self.rng.permutation(num_rows).astype(np.int64)

    def __call__(self, size: int) -> np.ndarray:
        start = int(self.rng.integers(0, self.perm.size - size + 1))
        return self.perm[start : start + size]


def summarize(lat_s: list[float], rows: int, row_bytes: int, *, cpu: dict[str, float] | None = None) -> dict[str, Any]:
    lat = np.asarray(lat_s)
    p50 = float(np.median(lat))
    out = {
        "reps": int(lat.size),
        "p50_ms": p50 * 1e3,
        "p99_ms": float(np.percentile(lat, 99)) * 1e3,
        "min_ms": float(lat.min()) * 1e3,
        "rows_per_s": rows / p50,
        "gb_per_s": rows * row_bytes / p50 / 1e9,
    }
    for k, v in (cpu or {}).items():
        out[f"{k}_cpu_ms"] = v * 1e3 / lat.size
    return out


def reps_for(rows: int, args: argparse.Namespace) -> int:
    return int(np.clip(args.target_rows // rows, args.min_reps, args.max_reps))


def timed(fn: Callable[[np.ndarray], Any], batches: Batches, *, rows: int, reps: int) -> list[float]:
    fn(batches(rows))  # warm-up
    lat = []
    for _ in range(reps):
        ids = batches(rows)
        t0 = time.perf_counter()
        fn(ids)
        lat.append(time.perf_counter() - t0)
    return lat


# -------------------------------------------------------------------------------------------------
# baselines


def bench_numpy(table: np.ndarray, batches: Batches, args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    default_threads = torch.get_num_threads()
    for dtype in args.dtypes:

        def gather(ids: np.ndarray, dtype: str = dtype) -> torch.Tensor:
            rows = torch.from_numpy(np.take(table, ids, axis=0))  # (B, D) fp32
            return rows.to(torch.bfloat16) if dtype == "bf16" else rows

        for rows in args.batches:
            best = None
            for threads in sorted({1, default_threads}):
                torch.set_num_threads(threads)
                r = summarize(
                    timed(gather, batches, rows=rows, reps=reps_for(rows, args)), rows, table.shape[1] * ITEMSIZE[dtype]
                )
                r["torch_threads"] = threads
                best = r if best is None or r["rows_per_s"] > best["rows_per_s"] else best
            assert best is not None
            out.append({"method": "numpy", "dtype": dtype, "batch": rows, **best})
    torch.set_num_threads(args.torch_threads)
    return out


def load_redis(url: str, table: np.ndarray, dtypes: list[str]) -> Any:
    import redis

    r = redis.Redis.from_url(url, socket_timeout=60)
    n, dim = table.shape
    for dtype in dtypes:
        data = torch.from_numpy(table).to(torch.bfloat16).view(torch.int16).numpy() if dtype == "bf16" else table
        raw, width = memoryview(data.tobytes()), dim * ITEMSIZE[dtype]
        for a in range(0, n, 20000):
            b = min(n, a + 20000)
            r.mset({b"%s:%d" % (dtype.encode(), i): raw[i * width : (i + 1) * width] for i in range(a, b)})
    return r


def settle_redis(r: Any, timeout_s: float = 300.0) -> float:
    """Rewrite Redis's append-only file now and wait for it -> seconds waited.

    Loading a million rows grows the AOF past its rewrite threshold; left alone, Redis forks and
    rewrites it (a core busy for seconds) in the middle of whatever is timed next, on a
    2-core machine the shards' lookups and the MGETs themselves."""
    import redis

    t0 = time.monotonic()
    if not int(r.info("persistence").get("aof_enabled", 0)):
        return 0.0
    with contextlib.suppress(redis.ResponseError):  # "already in progress": wait for that one
        r.bgrewriteaof()
    while time.monotonic() - t0 < timeout_s:
        p = r.info("persistence")
        if not (p.get("aof_rewrite_in_progress") or p.get("aof_rewrite_scheduled") or p.get("rdb_bgsave_in_progress")):
            break
        time.sleep(0.1)
    return time.monotonic() - t0


def bench_redis(r: Any, batches: Batches, args: argparse.Namespace, *, dim: int) -> list[dict[str, Any]]:
    import redis.utils

    out = []
    for dtype in args.dtypes:
        np_dtype, prefix = (np.int16 if dtype == "bf16" else np.float32), dtype.encode() + b":%d"

        def fetch(ids: np.ndarray, np_dtype: Any = np_dtype, prefix: bytes = prefix) -> torch.Tensor:
            values = r.mget([prefix % i for i in ids.tolist()])
            rows = torch.from_numpy(np.frombuffer(b"".join(values), dtype=np_dtype).reshape(ids.size, dim))
            return rows.view(torch.bfloat16) if np_dtype is np.int16 else rows

        for rows in args.batches:
            reps = max(3, reps_for(rows, args) // 4)
            res = summarize(timed(fetch, batches, rows=rows, reps=reps), rows, dim * ITEMSIZE[dtype])
            out.append(
                {"method": "redis_mget", "dtype": dtype, "batch": rows, "hiredis": redis.utils.HIREDIS_AVAILABLE, **res}
            )
    return out


def bench_dedup(batches: Batches, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The client's duplicate check (services.client.routing.dedup) on the same distinct ids."""
    from services.client.routing import dedup

    out = []
    for rows in args.batches:
        res = summarize(
            timed(lambda ids: dedup(ids, ids.shape), batches, rows=rows, reps=reps_for(rows, args)), rows, 8
        )
        out.append({"method": "client_dedup", "dtype": "int64", "batch": rows, **res})
    return out
