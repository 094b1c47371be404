"""Serving under offered load: `engram serve`'s OpenAI API at several concurrencies, tables local vs remote.

    python -m benchmarks.serve --json benchmarks/results/serve_cpu-2core.json
    python -m benchmarks.serve --ways local shm --rounds 5   # the shm-vs-local question alone
    python -m benchmarks.serve --quick            # smaller, for a check that it runs

Part 1 (benchmarks/serve_kv.py): decode speed of the KV-cache engine against the previous
full-window engine, in process, interleaved, medians of --reps.

Part 2 (real processes, benchmarks/serve_procs.py): a checkpoint of the preset (2 training
steps: the weights do not matter for speed) served by `engram serve` with the tables
  local   in the worker (worker.row_source=local)
  shm     on 2 shard processes, rows read in place from their shared-memory table files
  tcp     on the same 2 shards, rows over the framed TCP data plane
  grpc    on the same 2 shards, rows over the gRPC Lookup
(`--ways`, default all four). The remote ways share one LocalCluster (`engram cluster load`
puts the checkpoint's tables there once) and differ only in `cluster.row_path`. Every server
is up and has served one request of each workload (warm-up, not counted) before anything is
measured. Workloads: prefill-heavy (long prompt, few new tokens) and decode-heavy (short
prompt, many new tokens). Each concurrency level C runs C closed-loop streaming clients for
`--requests` requests in all; measured: generated tokens/s, prompt tokens/s, TTFT and
inter-token latency p50/p99 (client side, from the SSE stream), errors. A remote server that
logs a row-path fallback is counted (`fallbacks`): its figures would not be its path's.

Rounds (`--rounds N`): the whole offered-load part runs N times. Within a round each
(workload, C) level runs on every way back to back, in the order of --ways in even rounds and
reversed in odd ones (A B C D, D C B A, ...), so that drift of a shared machine hits all ways
alike and cancels between rounds. A remote way's ratio to local is computed per round from the
same level of the same round (paired), then summarised: per cell (way, workload, C) the median
and [min-max] over rounds of gen tokens/s and of that ratio. One run of one round is not enough
to settle a 5% question on a 2-core machine (round-to-round noise is ~±10%).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.machine import machine_info, write_report
from benchmarks.serve_kv import kv_speedup
from benchmarks.serve_procs import WAYS, Server, make_checkpoint, start_cluster, start_way, stop

WORKLOADS = {
    "prefill-heavy": dict(prompt_tokens=96, max_tokens=8),
    "decode-heavy": dict(prompt_tokens=8, max_tokens=64),
}


def fit_workloads(window: int) -> dict[str, dict[str, int]]:
    """WORKLOADS shrunk to a model.max_seq_len of `window`: new tokens at most half of it, the prompt the rest."""
    out = {}
    for name, wl in WORKLOADS.items():
        new = min(wl["max_tokens"], window // 2)
        out[name] = {"prompt_tokens": min(wl["prompt_tokens"], window - new), "max_tokens": new}
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def spread(xs: list[float]) -> dict[str, float]:
    """-> {median, min, max} over the finite values of xs (nan if none)."""
    ok = [x for x in xs if math.isfinite(x)]
    if not ok:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": float(statistics.median(ok)), "min": min(ok), "max": max(ok)}


async def offered_load(
    url: str, *, concurrency: int, requests: int, prompts: list[list[int]], max_tokens: int, model: str
) -> dict[str, Any]:
    ttft: list[float] = []
    itl: list[float] = []
    tokens = errors = prompt_tokens = 0
    first_error: list[str] = []
    queue = list(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors, prompt_tokens
        while queue:
            i = queue.pop()
            body = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": max_tokens,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            }
            t0 = last = time.perf_counter()
            n = 0
            try:
                async with http.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        errors += 1
                        first_error.append(f"{r.status_code} {(await r.aread())[:300]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        if "error" in json.loads(line[6:]):
                            errors += 1
                            first_error.append(line[:300])
                            break
                        t = time.perf_counter()
                        (ttft if n == 0 else itl).append(t - (t0 if n == 0 else last))
                        last, n = t, n + 1
            except httpx.HTTPError as exc:
                errors += 1
                first_error.append(repr(exc))
                continue
            tokens += n
            prompt_tokens += len(prompts[i % len(prompts)])

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency + 4)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": errors,
        "first_error": first_error[:1],
        "seconds": wall,
        "gen_tokens_per_s": tokens / wall,
        "prompt_tokens_per_s": prompt_tokens / wall,
        "ttft_p50_ms": 1e3 * pct(ttft, 50),
        "ttft_p99_ms": 1e3 * pct(ttft, 99),
        "itl_p50_ms": 1e3 * pct(itl, 50),
        "itl_p99_ms": 1e3 * pct(itl, 99),
    }


def round_order(ways: list[str], r: int) -> list[str]:
    """The ways' order in round r: as given in even rounds, reversed in odd ones (A B, B A, ...)."""
    return list(ways) if r % 2 == 0 else list(reversed(ways))


def run_rounds(
    servers: dict[str, Server],
    *,
    rounds: int,
    concurrency: list[int],
    requests: int,
    prompts: dict[str, list[list[int]]],
    workloads: dict[str, dict[str, int]],
) -> list[dict[str, Any]]:
    """Every (workload, C) level on every way, `rounds` times -> one row per (round, way, workload, C)."""
    ways = list(servers)
    rows = []
    for r in range(rounds):
        print(f"round {r + 1}/{rounds} (load average {os.getloadavg()[0]:.1f})", flush=True)
        for name, wl in workloads.items():
            for c in concurrency:
                for way in round_order(ways, r):
                    res = asyncio.run(
                        offered_load(
                            f"http://{servers[way].http}/v1/completions",
                            concurrency=c,
                            requests=max(requests, c),
                            prompts=prompts[name],
                            max_tokens=wl["max_tokens"],
                            model="engram",
                        )
                    )
                    res["fallbacks"] = servers[way].fallbacks()
                    rows.append({"round": r, "way": way, "workload": name, **res})
                    print(
                        f"  {way:<7} {name:<14} C={c:<3} {res['gen_tokens_per_s']:8.1f} gen tok/s  "
                        f"TTFT p50 {res['ttft_p50_ms']:7.1f} ms  ITL p50 {res['itl_p50_ms']:6.1f} ms  "
                        f"errors {res['errors']}" + (f"  FALLBACKS {res['fallbacks']}" if res["fallbacks"] else ""),
                        flush=True,
                    )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell (way, workload, C): median [min-max] over rounds of gen tok/s and of the paired ratio to local."""
    local = {(r["round"], r["workload"], r["concurrency"]): r["gen_tokens_per_s"] for r in rows if r["way"] == "local"}
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["way"], r["workload"], r["concurrency"]), []).append(r)
    out = []
    for (way, workload, c), rs in cells.items():
        ratios = []
        if way != "local":
            for r in rs:
                base = local.get((r["round"], workload, c))
                if base is not None:
                    ratios.append(r["gen_tokens_per_s"] / base if base else float("nan"))
        out.append(
            {
                "way": way,
                "workload": workload,
                "concurrency": c,
                "rounds": len(rs),
                "gen_tokens_per_s": spread([r["gen_tokens_per_s"] for r in rs]),
                "over_local": spread(ratios) if ratios else None,
                "over_local_per_round": ratios,
                "ttft_p50_ms": spread([r["ttft_p50_ms"] for r in rs]),
                "itl_p50_ms": spread([r["itl_p50_ms"] for r in rs]),
                "itl_p99_ms": spread([r["itl_p99_ms"] for r in rs]),
                "errors": sum(r["errors"] for r in rs),
                "fallbacks": max(r["fallbacks"] for r in rs),
            }
        )
    return out


def print_table(cells: list[dict[str, Any]]) -> None:
    def mm(s: dict[str, float], fmt: str) -> str:
        return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"

    print(
        f"\n{'way':<6} {'workload':<14} {'C':>3} {'gen tok/s median [min-max]':>28} "
        f"{'x local median [min-max]':>26} {'TTFT p50':>9} {'ITL p50':>8} {'ITL p99':>8} {'err':>4} {'fallbk':>6}"
    )
    for x in sorted(cells, key=lambda x: (x["workload"], x["concurrency"], WAYS.index(x["way"]))):
        ratio = mm(x["over_local"], ".3f") if x["over_local"] else "-"
        print(
            f"{x['way']:<6} {x['workload']:<14} {x['concurrency']:>3} {mm(x['gen_tokens_per_s'], '.1f'):>28} "
            f"{ratio:>26} {x['ttft_p50_ms']['median']:>7.1f}ms {x['itl_p50_ms']['median']:>6.2f}ms "
            f"{x['itl_p99_ms']['median']:>6.1f}ms {x['errors']:>4} {x['fallbacks']:>6}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least C)")
    ap.add_argument(
        "--ways",
        nargs="+",
        default=list(WAYS),
        choices=WAYS,
        help="local tables, or 2 shards read over shared memory, the TCP data plane or gRPC",
    )
    ap.add_argument("--rounds", type=int, default=None, help="repeats of the offered-load part (default 3, --quick 1)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the KV-cache comparison (medians)")
    ap.add_argument("--no-kv", action="store_true", help="skip part 1 (the KV-cache comparison)")
    ap.add_argument("--quick", action="store_true", help="concurrency 1 4, 8 requests, 1 round, a short decode")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests = [1, 4], 8
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        ap.error(f"--rounds: must be >= 1, got {rounds}")
    ways = list(dict.fromkeys(args.ways))  # each way once, in the order given
    with tempfile.TemporaryDirectory(prefix="engram-bench-serve-") as d:
        tmp = Path(d)
        checkpoint = make_checkpoint(tmp, args.preset)
        from tokenizers import Tokenizer

        from engram.checkpoint import load_model
        from engram.config import load_config

        _, cfg, tok_json = load_model(checkpoint)
        vocab = Tokenizer.from_str(tok_json).get_vocab_size()
        kv = None
        if not args.no_kv:
            print(f"load average {os.getloadavg()[0]:.1f}; part 1: decode, KV cache vs full-window forward", flush=True)
            kv = kv_speedup(checkpoint, batch=8, prompt=32, new_tokens=16 if args.quick else 32, reps=args.reps)
            for k, v in kv["tokens_per_s"].items():
                print(f"  {k:<32} {v:8.1f} tok/s")
            print(f"  speed-up {kv['speedup']:.2f}x (same greedy tokens: {kv['same_greedy_tokens']})", flush=True)
        gen = np.random.default_rng(1)
        workloads = fit_workloads(load_config(args.preset).model.max_seq_len)  # prompt + new tokens must fit
        prompts = {
            name: [gen.integers(3, vocab, wl["prompt_tokens"]).tolist() for _ in range(16)]
            for name, wl in workloads.items()
        }
        print(f"part 2: offered load against engram serve (HTTP, streaming), {rounds} round(s)", flush=True)
        servers: dict[str, Server] = {}
        cluster = None
        try:
            if any(w != "local" for w in ways):
                cluster = start_cluster(checkpoint, args.preset, tmp)
            sets = [f"worker.max_running={max(args.concurrency)}", "worker.max_queue=1024"]
            for way in ways:  # every server up first
                servers[way] = start_way(way, checkpoint=checkpoint, sets=sets, tmp=tmp, cluster=cluster)
            for way, server in servers.items():  # first requests (lazy set-up on each path) are not measured
                for name, wl in workloads.items():
                    warm = asyncio.run(
                        offered_load(
                            f"http://{server.http}/v1/completions",
                            concurrency=1,
                            requests=1,
                            prompts=prompts[name],
                            max_tokens=wl["max_tokens"],
                            model="engram",
                        )
                    )
                    if warm["errors"]:
                        raise RuntimeError(f"{way}: the warm-up request failed: {warm['first_error']}")
            t0 = time.perf_counter()
            rows = run_rounds(
                servers,
                rounds=rounds,
                concurrency=args.concurrency,
                requests=args.requests,
                prompts=prompts,
                workloads=workloads,
            )
            part2_s = time.perf_counter() - t0
        finally:
            for server in servers.values():
                stop(server.proc)
            if cluster is not None:
                cluster.stop()
    cells = summarize(rows)
    print_table(cells)
    over_local: dict[str, dict[str, float]] = {}  # way -> "workload C=c" -> median paired ratio
    for x in cells:
        if x["over_local"] is not None:
            over_local.setdefault(x["way"], {})[f"{x['workload']} C={x['concurrency']}"] = x["over_local"]["median"]
    for way, ratios in over_local.items():
        print(
            f"{way} throughput / local (median of {rounds}): " + ", ".join(f"{k}: {v:.3f}" for k, v in ratios.items())
        )
    out = {
        "machine": machine_info(),
        "load_average_1m": os.getloadavg()[0],
        "preset": args.preset,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "kv_cache_vs_full_window": kv,  # None with --no-kv
        "offered_load": rows,  # one row per (round, way, workload, C)
        "over_local": over_local,
        "workloads": workloads,
        "rounds": rounds,
        "round_order": [round_order(ways, r) for r in range(rounds)],
        "offered_load_seconds": part2_s,
        "cells": cells,
    }
    if args.json:
        write_report(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
