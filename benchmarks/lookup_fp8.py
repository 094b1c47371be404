"""Bytes moved by a 64K-row lookup in fp8 (E4M3 + UE8M0 block scales) vs bf16, with their latencies.

    python -m benchmarks.lookup_fp8 --json benchmarks/results/lookup_fp8_cpu-2core.json
    python -m benchmarks.lookup --fp8 ...        # the same section inside the lookup benchmark

V4.1-Flash's row: 256 dims, 264 bytes in fp8 vs 512 in bf16. Two real 1-shard clusters hold one
~130K-row x 256-dim table: one stored in fp32 (served as bf16, and as fp8 quantised on the
shard), one stored in fp8 (served as stored). For each (storage, wire, row path) the client
times `await client.lookup(table, ids, dedup_ids=False)` on 64K distinct random rows, which
includes the client's dequantisation to bf16 for fp8, and counts the row bytes that arrived
(the received (U, D + D/32) or (U, D) tensor of every reply, before dequantisation).
The fp8 / bf16 byte ratio is the issue's target (<= 0.53x).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import numpy as np

from benchmarks.machine import machine_info, write_report

TABLE = [
    "engram.layer_ids=[1]",
    "engram.n_head_per_ngram=8",
    "engram.n_embed_per_ngram=2048",
    "engram.table_size_per_ngram=[8191,8191]",
    "cluster.optimizer=adagrad",
]  # 16 heads: ~131K rows x 256
STORAGE = {
    "fp32": ["engram.row_format=fp32", "cluster.wire_dtype=bf16"],
    "fp8": ["engram.row_format=fp8", "cluster.wire_dtype=fp8"],
}
WIRES = {"fp32": ["bf16", "fp8"], "fp8": ["fp8"]}
TARGET_RATIO = 0.53


async def _time(cluster: Any, *, wire: str, path: str, rows: int, reps: int) -> dict[str, Any]:
    from services.client import ShardClient

    cp = cluster.control()
    client = await ShardClient.connect(cp, wire_dtype=wire, row_path=path, timeout_s=120)
    try:
        n = client.layouts[1].num_rows
        rng = np.random.default_rng(0)
        lat, moved = [], []
        for i in range(reps + 1):  # the first is a warm-up
            ids = rng.permutation(n)[:rows].astype(np.int64)
            t0 = time.perf_counter()
            handle = client.lookup(1, ids, dedup_ids=False)
            values = await handle  # (rows, 256) bf16: dequantised on the client for fp8
            dt = time.perf_counter() - t0
            wire_rows = await handle.wire_rows()
            assert values.shape == (rows, 256), values.shape
            if i:
                lat.append(dt)
                moved.append(wire_rows.numel() * wire_rows.element_size())
        used = {k: v for k, v in client.row_paths.used.items() if v}
        if set(used) != {path}:
            raise RuntimeError(f"row path {path}: lookups went over {used}")
    finally:
        await client.close()
        await cp.close()
    return {
        "wire": wire,
        "path": path,
        "batch": rows,
        "reps": reps,
        "bytes_per_lookup": int(np.median(moved)),
        "bytes_per_row": float(np.median(moved)) / rows,
        "p50_ms": float(np.median(lat)) * 1e3,
        "p99_ms": float(np.percentile(lat, 99)) * 1e3,
    }


def run_fp8(
    *, preset: str = "cpu", paths: tuple[str, ...] = ("tcp", "grpc"), rows: int = 65536, reps: int = 7
) -> dict[str, Any]:
    """-> {"results": [...], "ratio": fp8/bf16 bytes per 64K-row lookup, ...}; prints a table and the line."""
    from engram.config import load_config
    from services.launcher import LocalCluster

    results = []
    for storage, extra in STORAGE.items():
        overrides = [*TABLE, *extra]
        cfg = load_config(preset, None, overrides)
        print(f"fp8 section: 1 shard, {storage} storage ...", flush=True)
        with LocalCluster(cfg, preset=preset, overrides=overrides, num_shards=1, startup_timeout_s=300) as cluster:
            for wire in WIRES[storage]:
                for path in paths:
                    r = {"storage": storage, **asyncio.run(_time(cluster, wire=wire, path=path, rows=rows, reps=reps))}
                    results.append(r)
                    print(
                        f"  {storage:>4} storage, {wire:>4} wire, {path:<4}: {r['bytes_per_row']:6.1f} B/row, "
                        f"{r['bytes_per_lookup'] / 2**20:6.2f} MiB/lookup, p50 {r['p50_ms']:7.2f} ms",
                        flush=True,
                    )
    bf16 = next(r for r in results if r["wire"] == "bf16")
    fp8 = next(r for r in results if r["wire"] == "fp8" and r["storage"] == "fp8")
    ratio = fp8["bytes_per_lookup"] / bf16["bytes_per_lookup"]
    print(
        f"fp8 vs bf16: a {rows // 1024}K-row lookup moves {fp8['bytes_per_lookup']:,} vs {bf16['bytes_per_lookup']:,} "
        f"row bytes = {ratio:.4f}x (target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'MISSED'}); "
        f"p50 {fp8['p50_ms']:.1f} vs {bf16['p50_ms']:.1f} ms over {fp8['path']}"
    )
    return {
        "batch": rows,
        "dim": 256,
        "ratio_fp8_over_bf16_bytes": ratio,
        "ratio_target": TARGET_RATIO,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lookup_fp8",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--paths", type=lambda s: tuple(s.split(",")), default=("tcp", "grpc"))
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    info = machine_info()
    t0 = time.monotonic()
    out = run_fp8(preset=args.preset, paths=args.paths, rows=args.rows, reps=args.reps)
    info["load_avg_end"] = os.getloadavg()
    info["wall_s"] = time.monotonic() - t0
    if args.json:
        write_report(args.json, {"benchmark": "lookup_fp8", "machine": info, "table": TABLE, "fp8": out})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
