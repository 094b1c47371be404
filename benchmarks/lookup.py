"""Lookup benchmark: every row path of the shards vs in-process numpy vs Redis MGET, one run.

    python -m benchmarks.lookup --json benchmarks/results/lookup_cpu-2core.json
    engram bench lookup --shards 1 --batches 1024,65536 --dtypes bf16          # a quick look

For 1, 2 and 4 real shard processes (LocalCluster: real redis-server, `python -m services.shard`)
holding one ~1M-row x 64-dim table, it times `await client.lookup(table, ids, dedup_ids=False)`
for batches of 1K..256K distinct random rows with bf16 and fp32 on the wire, once per row
path (`--paths`): `shm` (the client maps the shard's table file and gathers itself), `tcp`
(the framed data plane), `grpc` (the Lookup RPC). That is the full client path minus dedup:
routing, concurrent chunked requests, reassembly into a (B, 64) tensor. Ids are distinct on
every side (the worker's indexer dedups once, local or remote); the client's dedup check
on the same ids is timed on its own (method `client_dedup`). In the same
run, the same rows are (a) gathered in this process with numpy (np.take on the fp32 table,
then torch's bf16 conversion: the memory-bandwidth limit, best of 1 thread and torch's
default threads) and (b) fetched from the same Redis with one MGET through redis-py +
hiredis, each row stored as one key holding its bytes. This process runs with
`services.client.keep_heap()` (malloc keeps freed pages; `--malloc default` to compare),
which the numpy and Redis baselines share. The client runs on uvloop, as in the worker and
the trainer (`services.client.loop.LoopThread`; `--loop asyncio` for the default loop). CPU
time per lookup is recorded for
the client process and the shard processes, which shows where the time goes even on a busy
machine. Latencies: p50/p99 over the repetitions (count in the JSON).

`--tls`: after each plain cluster, the same shards again with mTLS and roles on (throwaway
certificates, as `engram up`), the client holding the read role: rows `tcp+tls` and
`grpc+tls` beside the plain `tcp` and `grpc` (shm does not touch the network: no TLS row).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import numpy as np
import psutil
import torch

from benchmarks.lookup_baselines import (
    ITEMSIZE,
    Batches,
    bench_dedup,
    bench_numpy,
    bench_redis,
    load_redis,
    reps_for,
    settle_redis,
    summarize,
)
from benchmarks.lookup_report import MGET_TARGET, TARGETS, print_table, targets, tls_cost
from benchmarks.machine import machine_info, write_report
from engram.config import Config, load_config
from engram.config_args import add_config_args

TABLE = [
    "engram.layer_ids=[1]",
    "engram.n_head_per_ngram=8",
    "engram.n_embed_per_ngram=512",
    "engram.table_size_per_ngram=[65521,65521]",
    "cluster.optimizer=adagrad",
]  # 16 heads: ~1.05M rows x 64
BATCHES = [1024, 4096, 16384, 65536, 262144]


# -------------------------------------------------------------------------------------------------
# shards


async def bench_shards(cluster: Any, batches: Batches, args: argparse.Namespace, *, table: np.ndarray | None) -> list:
    out = []
    for path in args.paths:
        if cluster.tls and path == "shm":
            continue  # shared memory never crosses the network: nothing for TLS to cost
        out += await bench_path(cluster, batches, args, table=table, path=path)
    return out


async def bench_path(
    cluster: Any, batches: Batches, args: argparse.Namespace, *, table: np.ndarray | None, path: str
) -> list:
    label = f"{path}+tls" if cluster.tls else path
    from services.client import ShardClient

    cp = cluster.control()
    out = []
    procs = [psutil.Process(p.pid) for p in cluster.shards.values()]
    try:
        for dtype in args.dtypes:
            client = await ShardClient.connect(
                cp, wire_dtype=dtype, timeout_s=120, row_path=path, security=cluster.security("read")
            )
            dim = client.layouts[1].dim
            try:
                if table is not None:  # the shards serve exactly the rows the baselines use
                    ids = batches(4096)
                    want = torch.from_numpy(table[ids])
                    got = await client.lookup(1, ids, upcast=True)
                    assert torch.equal(got, want.to(torch.bfloat16).float() if dtype == "bf16" else want)
                for rows in args.batches:
                    await client.lookup(1, batches(rows), dedup_ids=False)  # warm-up
                    lat, reps = [], reps_for(rows, args)
                    cpu0, srv0 = time.process_time(), sum(sum(p.cpu_times()[:2]) for p in procs)
                    for _ in range(reps):
                        ids = batches(rows)
                        t0 = time.perf_counter()
                        await client.lookup(1, ids, dedup_ids=False)
                        lat.append(time.perf_counter() - t0)
                    cpu = {
                        "client": time.process_time() - cpu0,
                        "shards": sum(sum(p.cpu_times()[:2]) for p in procs) - srv0,
                    }
                    res = summarize(lat, rows, dim * ITEMSIZE[dtype], cpu=cpu)
                    used = {k: v for k, v in client.row_paths.used.items() if v}
                    if set(used) != {path}:  # a fallback would make the row lie
                        raise RuntimeError(f"row path {path}: lookups went over {used}")
                    client.row_paths.used.update(dict.fromkeys(used, 0))
                    out.append({"method": label, "shards": len(procs), "dtype": dtype, "batch": rows, **res})
                    print(
                        f"  {label:<8} {len(procs)} shard(s) {dtype} {rows:>7}: {res['rows_per_s'] / 1e6:7.2f} "
                        f"Mrows/s p50 {res['p50_ms']:7.3f} ms",
                        flush=True,
                    )
            finally:
                await client.close()
    finally:
        await cp.close()
    return out


async def fetch_table(cluster: Any) -> np.ndarray:
    from services.client import ShardClient

    cp = cluster.control()
    client = await ShardClient.connect(cp, wire_dtype="fp32", timeout_s=300, security=cluster.security("read"))
    try:
        n = client.layouts[1].num_rows
        return (await client.lookup(1, np.arange(n))).numpy()  # (N, D) fp32, what the shards hold
    finally:
        await client.close()
        await cp.close()


# -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="engram bench lookup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser, default_preset="cpu")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--shards", type=ints, default=[1, 2, 4], help="comma-separated shard counts")
    parser.add_argument("--batches", type=ints, default=BATCHES, help="comma-separated batch sizes (rows)")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["bf16", "fp32"])
    parser.add_argument(
        "--paths", type=lambda s: s.split(","), default=["shm", "tcp", "grpc"], help="row paths to time: shm, tcp, grpc"
    )
    parser.add_argument("--target-rows", type=int, default=1 << 20, help="rows timed per configuration")
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-reps", type=int, default=60)
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of this (client) process")
    parser.add_argument("--no-baselines", action="store_true", help="skip numpy and Redis")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also time tcp and grpc with mTLS + roles (rows tcp+tls, grpc+tls) on a second cluster",
    )
    parser.add_argument(
        "--malloc",
        choices=["keep-heap", "default"],
        default="keep-heap",
        help="keep-heap: services.client.keep_heap() in this process (see services/client/memory.py)",
    )
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the client's event loop (the worker's and the trainer's is uvloop)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="also: bytes per 64K-row lookup, fp8 vs bf16 (benchmarks/lookup_fp8.py; 256-dim rows)",
    )
    args = parser.parse_args(argv)
    bad = [d for d in args.dtypes if d not in ITEMSIZE]
    if bad:
        parser.error(f"--dtypes: unknown {bad} (bf16, fp32)")
    bad = [p for p in args.paths if p not in TARGETS]
    if bad:
        parser.error(f"--paths: unknown {bad} (shm, tcp, grpc)")
    return args


def main(argv: list[str] | None = None) -> int:
    from services.client.client import DEFAULT_CHUNK_BYTES
    from services.launcher import LocalCluster

    args = parse_args(argv)
    cfg: Config = load_config(args.preset, args.config, [*TABLE, *args.overrides])
    torch.set_num_threads(args.torch_threads)
    if args.malloc == "keep-heap":
        from services.client import keep_heap

        keep_heap()
    info = machine_info()
    t_start = time.monotonic()
    results: list[dict[str, Any]] = []
    table: np.ndarray | None = None
    for num_shards, tls in [(n, t) for n in args.shards for t in ([False, True] if args.tls else [False])]:
        print(f"starting {num_shards} shard(s){' with TLS' if tls else ''} ...", flush=True)
        with LocalCluster(
            cfg,
            preset=args.preset,
            config_file=args.config,
            overrides=[*TABLE, *args.overrides],
            num_shards=num_shards,
            startup_timeout_s=300,
            tls=tls,
        ) as cluster:
            if table is None and not args.no_baselines:
                table = asyncio.run(fetch_table(cluster))
                batches = Batches(table.shape[0])
                print(
                    f"table: {table.shape[0]:,} rows x {table.shape[1]} dims; numpy and Redis baselines ...", flush=True
                )
                results += bench_numpy(table, batches, args)
                results += bench_dedup(batches, args)
                r = load_redis(cluster.redis_url, table, args.dtypes)
                info["redis_settle_s"] = settle_redis(r)  # its AOF rewrite now, not while lookups are timed
                results += bench_redis(r, batches, args, dim=table.shape[1])
                r.close()
            num_rows = int(table.shape[0]) if table is not None else sum(cfg_rows(cfg))
            results += run_loop(bench_shards(cluster, Batches(num_rows, seed=num_shards), args, table=table), args.loop)
    fp8 = None
    if args.fp8:  # its own clusters (256-dim rows, fp8 and fp32 storage); prints the fp8 vs bf16 line
        from benchmarks.lookup_fp8 import run_fp8

        fp8 = run_fp8(preset=args.preset, paths=tuple(p for p in args.paths if p != "shm") or ("tcp",))
    info["load_avg_end"] = os.getloadavg()
    info["wall_s"] = time.monotonic() - t_start
    print_table(results)
    cost = tls_cost(results)
    if cost:
        print(
            f"\nTLS cost (same run): {'path':<5} {'shards':>6} {'dtype':<5} {'batch':>7} {'plain p50':>10} "
            f"{'tls p50':>10} {'p50 x':>6} {'rows/s x':>8}"
        )
        for c in cost:
            print(
                f"{'':<20}{c['path']:<5} {c['shards']:>6} {c['dtype']:<5} {c['batch']:>7} {c['plain_p50_ms']:>10.3f} "
                f"{c['tls_p50_ms']:>10.3f} {c['p50_ratio']:>6.2f} {c['throughput_ratio']:>8.2f}"
            )
    report = {
        "benchmark": "lookup",
        "machine": info,
        "table": {
            "overrides": TABLE,
            "dim": cfg.engram.n_embed_per_ngram // cfg.engram.n_head_per_ngram,
            "num_rows": sum(cfg_rows(cfg)),
        },
        "client_torch_threads": args.torch_threads,
        "client_malloc": args.malloc,
        "client_loop": args.loop,
        "client_chunk_bytes": DEFAULT_CHUNK_BYTES,
        "targets": targets(results),
        "tls_cost": cost,
        "results": results,
        **({"fp8": fp8} if fp8 else {}),
    }
    nan = float("nan")
    for path, t in report["targets"].items():
        if isinstance(t, dict):
            print(
                f"{path:<4}: 64K bf16 rows from 1 shard {t.get('of_numpy', nan):.2f}x the in-process gather (target "
                f"{t.get('of_numpy_target', '-')}), {t.get('over_redis_mget', nan):.1f}x Redis MGET (target "
                f"{MGET_TARGET if path != 'grpc' else '-'}); 1K rows p50 {t.get('p50_1k_ms', nan) * 1e3:.0f} us "
                f"(target {t.get('p50_1k_ms_target', nan) * 1e3:.0f} us)"
            )
    print(f"{info['wall_s']:.0f} s, load average {info['load_avg_start'][0]:.1f} -> {info['load_avg_end'][0]:.1f}")
    if args.json:
        write_report(args.json, report)
    return 0


def run_loop(coro: Any, loop: str) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def cfg_rows(cfg: Config) -> list[int]:
    from engram.layout import table_layouts

    return [lay.num_rows for lay in table_layouts(cfg.engram).values()]


if __name__ == "__main__":
    sys.exit(main())
