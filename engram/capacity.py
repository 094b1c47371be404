"""Capacity planning for a layout: shard memory, per-shard load, worker bandwidth, cache hit rate.

Pure arithmetic on the layout (`engram.layout`) and the row format (`engram.row_format`); the
CLI (`engram plan`) only parses and prints. The model of the cluster:

- `num_shards` partitions of `num_slots` slots (contiguous runs, `even_slot_map`), each held by
  `replicas` shard processes, one per node; a node must hold its shard's rows (+ optimizer
  state when the tables train) within `node_ram * (1 - ram_reserve)`.
- Every token reads one row from every head table of every Engram layer; rows hash uniformly
  over slots, so a shard serves its share of the rows; reads spread evenly over the replicas.
- Each worker's hot-row cache (rows in the cache dtype, bf16 by default) removes the hits before
  the wire. Hit rate: the rows of each head table are accessed Zipf(s) over all its P rows
  (collisions ignored), the cache holds the top C rows split evenly over the head tables, so a
  table's hit rate is H(C, s) / H(P, s) with H the generalized harmonic number. The exponent per
  n-gram order defaults to `MEASURED_ZIPF` (below). This is the static-top-C rate; an LRU cache
  gets somewhat less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from engram.config import EngramConfig
from engram.layout import even_slot_map, slot_num_rows, table_layouts
from engram.row_format import check_format, check_wire_format, row_nbytes

# Zipf exponents of n-gram frequency by order, measured by benchmarks/ngram_stats.py on the default
# corpus (Python's stdlib, 4 MiB, the cpu preset's 2048-token BPE compressed to 1447 ids, 1.3M tokens;
# benchmarks/results/ngram_stats_default-corpus.json). Orders above 4 reuse order 4's exponent.
MEASURED_ZIPF = {2: 0.807, 3: 0.706, 4: 0.621}
ID_BYTES = 8  # row ids travel as int64 (proto/shard/v1/shard.proto)
OPTIMIZER_STATE_BYTES = {"none": lambda dim: 0, "adam": lambda dim: 2 * 4 * dim, "adagrad": lambda dim: 4}


def generalized_harmonic(n: int, s: float) -> float:
    """H(n, s) = sum_{k=1}^{n} k^-s; exact below 10^4 terms, Euler-Maclaurin beyond (error < 1e-12)."""
    if n <= 0:
        return 0.0
    m = min(n, 10_000)
    head = math.fsum(k**-s for k in range(1, m + 1))
    if n == m:
        return head
    # sum_{k=m+1}^{n} f(k) = int_m^n f + (f(n) - f(m))/2 + (f'(n) - f'(m))/12 - ..., f(x) = x^-s
    integral = math.log(n / m) if s == 1 else (n ** (1 - s) - m ** (1 - s)) / (1 - s)
    f_m, f_n = m**-s, n**-s
    df_m, df_n = -s * m ** (-s - 1), -s * n ** (-s - 1)
    return head + integral + (f_n - f_m) / 2 + (df_n - df_m) / 12


def zipf_hit_rate(cached: int, population: int, s: float) -> float:
    """Fraction of Zipf(s) accesses over `population` items that hit the `cached` most popular."""
    if cached <= 0:
        return 0.0
    if cached >= population:
        return 1.0
    return generalized_harmonic(cached, s) / generalized_harmonic(population, s)


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanInput:
    engram: EngramConfig
    row_format: str  # storage format of the tables
    num_shards: int
    replicas: int
    node_ram_bytes: int
    gpu_tokens_per_s: float  # per worker (one GPU each)
    workers: int = 1
    wire_format: str | None = None  # None -> the storage format
    num_slots: int = 256
    cache_bytes_per_worker: int = 0
    cache_value_bytes: int = 2  # the worker caches dequantised rows (bf16)
    zipf: dict[int, float] = field(default_factory=lambda: dict(MEASURED_ZIPF))
    ram_reserve: float = 0.1  # fraction of node RAM left to the OS and the process
    optimizer: str = "none"  # none (frozen, serving) | adam | adagrad: state kept beside each row


def _check(inp: PlanInput) -> None:
    check_format(inp.row_format, what="format")
    for name in ("num_shards", "replicas", "num_slots", "workers"):
        value = getattr(inp, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if inp.num_shards > inp.num_slots:
        raise ValueError(f"num_shards: {inp.num_shards} shards need at least as many slots ({inp.num_slots})")
    if inp.node_ram_bytes <= 0 or not inp.gpu_tokens_per_s > 0:
        raise ValueError("node_ram and gpu_tokens_per_s: must be positive")
    if inp.cache_bytes_per_worker < 0 or not 0 <= inp.ram_reserve < 1:
        raise ValueError("cache bytes must be >= 0 and ram_reserve in [0, 1)")
    if inp.optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer: unknown {inp.optimizer!r} ({', '.join(OPTIMIZER_STATE_BYTES)})")
    if inp.row_format == "fp8" and inp.optimizer != "none":
        raise ValueError("optimizer: tables stored in fp8 are read-only; plan them with optimizer none")


def plan(inp: PlanInput) -> dict[str, Any]:
    """The plan as plain numbers (bytes, rows/s, bytes/s); see the module docstring for the model."""
    _check(inp)
    wire = inp.wire_format or inp.row_format
    layouts = table_layouts(inp.engram)
    tables = []
    shard_bytes = [0] * inp.num_shards
    shard_rows = [0] * inp.num_shards
    slot_map = even_slot_map(inp.num_slots, inp.num_shards)
    for layer, t in layouts.items():
        check_wire_format(storage=inp.row_format, wire=wire, dim=t.dim)
        stored = row_nbytes(inp.row_format, t.dim) + OPTIMIZER_STATE_BYTES[inp.optimizer](t.dim)
        tables.append(
            {
                "layer": layer,
                "rows": t.num_rows,
                "dim": t.dim,
                "heads": len(t.head_sizes),
                "row_bytes": row_nbytes(inp.row_format, t.dim),
                "stored_row_bytes": stored,
                "bytes": t.num_rows * stored,
            }
        )
        for slot, shard in enumerate(slot_map):
            n = slot_num_rows(t.num_rows, slot, inp.num_slots)
            shard_rows[shard] += n
            shard_bytes[shard] += n * stored
    total_rows = sum(t["rows"] for t in tables)
    total_bytes = sum(t["bytes"] for t in tables)
    usable = int(inp.node_ram_bytes * (1 - inp.ram_reserve))
    busiest = max(range(inp.num_shards), key=lambda s: shard_rows[s])
    busiest_share = shard_rows[busiest] / total_rows

    # reads: one row per head table per token; the cache hit rate per order
    dims = {layer: t.dim for layer, t in layouts.items()}
    n_tables = sum(len(t.head_sizes) for t in layouts.values())
    rows_per_token = n_tables
    cache_rows_per_table = [
        inp.cache_bytes_per_worker // (n_tables * dims[layer] * inp.cache_value_bytes) for layer in layouts
    ]
    hits = []
    H = inp.engram.n_head_per_ngram
    for t, cache_rows in zip(layouts.values(), cache_rows_per_table):
        for j, p in enumerate(t.head_sizes):
            order = 2 + j // H
            s = inp.zipf.get(order, inp.zipf[max(inp.zipf)])
            hits.append(zipf_hit_rate(cache_rows, p, s))
    hit_rate = sum(hits) / len(hits)
    wire_row_bytes = sum(row_nbytes(wire, dims[layer]) * len(t.head_sizes) for layer, t in layouts.items()) / n_tables

    tokens_per_s = inp.gpu_tokens_per_s * inp.workers
    demand_rows = tokens_per_s * rows_per_token * (1 - hit_rate)  # rows/s the cluster must serve
    shard_rows_per_s = demand_rows * busiest_share / inp.replicas
    worker_rows_per_s = inp.gpu_tokens_per_s * rows_per_token * (1 - hit_rate)
    return {
        "layout": {
            "tables": tables,
            "total_rows": total_rows,
            "total_bytes": total_bytes,
            "row_format": inp.row_format,
            "wire_format": wire,
            "optimizer": inp.optimizer,
        },
        "cluster": {
            "num_shards": inp.num_shards,
            "replicas": inp.replicas,
            "nodes": inp.num_shards * inp.replicas,
            "num_slots": inp.num_slots,
            "stored_bytes_all_replicas": total_bytes * inp.replicas,
        },
        "shard": {
            "bytes_max": max(shard_bytes),
            "bytes_min": min(shard_bytes),
            "rows_max": shard_rows[busiest],
            "node_ram_bytes": inp.node_ram_bytes,
            "usable_ram_bytes": usable,
            "fits": max(shard_bytes) <= usable,
            "rows_per_s": shard_rows_per_s,
            "bytes_per_s": shard_rows_per_s * wire_row_bytes,
        },
        "worker": {
            "workers": inp.workers,
            "tokens_per_s": inp.gpu_tokens_per_s,
            "rows_per_token": rows_per_token,
            "cache_bytes": inp.cache_bytes_per_worker,
            "cache_rows_per_table": min(cache_rows_per_table),
            "cache_hit_rate": hit_rate,
            "rows_per_s": worker_rows_per_s,
            "rx_bytes_per_s": worker_rows_per_s * wire_row_bytes,
            "tx_bytes_per_s": worker_rows_per_s * ID_BYTES,
        },
        "zipf": {str(k): v for k, v in sorted(inp.zipf.items())},
    }


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_bytes(text: str) -> int:
    """'512GiB' -> 549755813888; '1.5TB' -> 1.5e12; '4096' -> 4096 bytes."""
    raw = text.strip().upper().replace(" ", "")
    unit = raw.rstrip("B") if raw.endswith("B") else raw
    num = unit.rstrip("KMGTI")
    suffix = unit[len(num) :]
    if suffix not in _UNITS or not num:
        raise ValueError(f"size: cannot parse {text!r} (e.g. 512GiB, 64GB, 1.5TiB, 4096)")
    try:
        value = float(num) * _UNITS[suffix]
    except ValueError:
        raise ValueError(f"size: cannot parse {text!r} (e.g. 512GiB, 64GB, 1.5TiB, 4096)") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"size: must be a non-negative finite size, got {text!r}")
    return int(value)
