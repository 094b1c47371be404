"""Serving under offered load: `engram serve`'s OpenAI API at several concurrencies, tables local vs remote.

    python -m benchmarks.serve --json benchmarks/results/serve_cpu-2core.json
    python -m benchmarks.serve --quick            # smaller, for a check that it runs

Part 1 (in process, same model, same prompts, interleaved, medians of --reps): decode speed
of the KV-cache engine (`worker.scheduler`: paged KV cache, continuous batching, one new
token per sequence per step) against the previous engine (`worker.engine.ModelEngine`: a
full-window forward for every new token, batched). Ratio = new tokens/s over old tokens/s.

Part 2 (real processes): a checkpoint of the preset (2 training steps: the weights do not
matter for speed) served by `engram serve` with the tables
  local   in the worker (worker.row_source=local)
  shm     on 2 shard processes, rows read in place from their shared-memory table files
  tcp     on the same 2 shards, rows over the framed TCP data plane
  grpc    on the same 2 shards, rows over the gRPC Lookup
(`--ways`, default all four). The remote ways share one LocalCluster (`engram cluster load`
puts the checkpoint's tables there once) and differ only in `cluster.row_path`. Every server
is up first; each (workload, concurrency) level then runs on each way in turn, so that load
from a shared machine hits all alike. A remote server that logs a row-path fallback is
counted (`fallbacks`): its figures would not be its path's. Workloads: prefill-heavy (long
prompt, few new tokens) and decode-heavy (short prompt, many new tokens). Each concurrency
level C runs C closed-loop streaming clients for `--requests` requests in all; reported:
generated tokens/s, prompt tokens/s, TTFT and inter-token latency p50/p99 (client side, from
the SSE stream), errors, and each remote way's throughput over local's at the same level.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.machine import machine_info, write_report

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("local", "shm", "tcp", "grpc")
FALLBACK_MARK = "path unavailable"  # services/client/row_paths.py logs this once per fallen-back path
WORKLOADS = {
    "prefill-heavy": dict(prompt_tokens=96, max_tokens=8),
    "decode-heavy": dict(prompt_tokens=8, max_tokens=64),
}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


# --------------------------------------------------------------------------------------------- part 1


def kv_speedup(checkpoint: Path, *, batch: int, prompt: int, new_tokens: int, reps: int) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from engram.checkpoint import load_model
    from worker.engine import ModelEngine, Work
    from worker.prefetch import LocalRowSource, PrefetchPipeline
    from worker.scheduler import Scheduler
    from worker.sequence import EngramOptions, SamplingParams, Sequence

    model, cfg, tok_json = load_model(checkpoint)
    tok = Tokenizer.from_str(tok_json)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, tok.get_vocab_size(), (prompt,), generator=gen).tolist() for _ in range(batch)]
    engine = ModelEngine(model, cfg, num_tokens=tok.get_vocab_size())

    def old() -> tuple[float, list[list[int]]]:
        seqs = [list(p) for p in prompts]
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = engine.logprobs([Work(ids=s[-cfg.model.max_seq_len :], last_only=True) for s in seqs])
            for s, lp in zip(seqs, out):
                s.append(int(lp.argmax()))
        return time.perf_counter() - t0, [s[prompt:] for s in seqs]

    def new() -> tuple[float, list[list[int]]]:
        async def run() -> tuple[float, list[list[int]]]:
            ex = cf.ThreadPoolExecutor(1)
            sched = Scheduler(
                model,
                pipeline=PrefetchPipeline(model, LocalRowSource(model)),
                num_tokens=tok.get_vocab_size(),
                eot=None,
                executor=ex,
                kv_cache_mb=64,
                block_size=16,
                max_step_tokens=4096,
                max_running=batch,
                max_queue=batch,
            )
            sched.start()
            loop = asyncio.get_running_loop()
            seqs = [
                Sequence(
                    prompt_ids=p,
                    tok=tok,
                    loop=loop,
                    options=EngramOptions(),
                    params=SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eot=True),
                )
                for p in prompts
            ]
            t0 = time.perf_counter()
            for s in seqs:
                sched.submit(s)
            outs = []
            for s in seqs:
                toks = []
                while True:
                    ev = await s.events.get()
                    toks.append(ev.token_id)  # type: ignore[union-attr]
                    if ev.finish_reason:  # type: ignore[union-attr]
                        break
                outs.append(toks)
            dt = time.perf_counter() - t0
            await sched.close()
            ex.shutdown()
            return dt, outs

        return asyncio.run(run())

    times: dict[str, list[float]] = {"full-window (previous engine)": [], "kv-cache (scheduler)": []}
    same = True
    for _ in range(reps):  # interleaved: A B A B ...
        t_old, o_old = old()
        t_new, o_new = new()
        times["full-window (previous engine)"].append(t_old)
        times["kv-cache (scheduler)"].append(t_new)
        same = same and o_old == o_new
    tok_s = {k: batch * new_tokens / statistics.median(v) for k, v in times.items()}
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "reps": reps,
        "tokens_per_s": tok_s,
        "seconds": times,
        "same_greedy_tokens": same,
        "speedup": tok_s["kv-cache (scheduler)"] / tok_s["full-window (previous engine)"],
    }


# --------------------------------------------------------------------------------------------- part 2


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


def serve_process(checkpoint: Path, sets: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with log.open("w") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engram_cli.main",
                "serve",
                "--checkpoint",
                str(checkpoint),
                "--port",
                "0",
                "--set",
                "worker.http_port=0",
                *[f"--set={s}" for s in sets],
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, dict(p.split("=", 1) for p in line.split()[1:])["http"]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"engram serve did not print READY (log: {log.read_text()[-2000:]})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def make_checkpoint(tmp: Path, preset: str) -> Path:
    from engram.config import load_config
    from trainer.local import train_local

    words = ["def", "return", "value", "self", "class", "import", "for", "in", "if", "else", "(", ")", ":"]
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(4000)))
    cfg = load_config(
        preset,
        None,
        [
            f'train.corpus=["{tmp / "corpus.txt"}"]',
            f"tokenizer.cache_dir={tmp / 'tok'}",
            f"train.out_dir={tmp / 'run'}",
            "train.progress=false",
            "train.steps=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.warmup_steps=1",
        ],
    )
    return Path(train_local(cfg).checkpoint)


def start_cluster(checkpoint: Path, preset: str, tmp: Path) -> Any:
    """2 shard processes holding the checkpoint's tables (`engram cluster load`)."""
    from services.launcher import LocalCluster

    cluster = LocalCluster(
        preset=preset, overrides=[], num_shards=2, log_dir=tmp / "logs-cluster", startup_timeout_s=120
    )
    cluster.start()
    load = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_cli.main",
            "cluster",
            "load",
            str(checkpoint),
            "--preset",
            preset,
            *[f"--set={o}" for o in cluster.cluster_overrides],
            "--name",
            f"bench-serve-{tmp.name}",  # slot files under the cluster's checkpoint root
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if load.returncode:
        cluster.stop()
        raise RuntimeError(f"engram cluster load failed: {load.stderr}")
    return cluster


def start_way(way: str, checkpoint: Path, args: argparse.Namespace, tmp: Path, cluster: Any) -> dict[str, Any]:
    """`engram serve` for one way -> {proc, http, log}."""
    sets = [f"worker.max_running={max(args.concurrency)}", "worker.max_queue=1024"]
    if way != "local":
        sets += ["worker.row_source=remote", f"cluster.row_path={way}", *cluster.cluster_overrides]
    log = tmp / f"serve-{way}.log"
    proc, http = serve_process(checkpoint, sets, log)
    return {"proc": proc, "http": http, "log": log}


def fallbacks(server: dict[str, Any]) -> int:
    """Row-path fallbacks the server logged so far (0 for a way that stayed on its path)."""
    return sum(FALLBACK_MARK in line for line in server["log"].read_text(errors="replace").splitlines())


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
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the KV-cache comparison (medians)")
    ap.add_argument("--quick", action="store_true", help="concurrency 1 4, 8 requests, 3 reps of a short decode")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.requests = [1, 4], 8
    with tempfile.TemporaryDirectory(prefix="engram-bench-serve-") as d:
        tmp = Path(d)
        checkpoint = make_checkpoint(tmp, args.preset)
        from engram.checkpoint import load_model

        _, cfg, tok_json = load_model(checkpoint)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(tok_json).get_vocab_size()
        print(f"load average {os.getloadavg()[0]:.1f}; part 1: decode, KV cache vs full-window forward", flush=True)
        kv = kv_speedup(checkpoint, batch=8, prompt=32, new_tokens=16 if args.quick else 32, reps=args.reps)
        for k, v in kv["tokens_per_s"].items():
            print(f"  {k:<32} {v:8.1f} tok/s")
        print(f"  speed-up {kv['speedup']:.2f}x (same greedy tokens: {kv['same_greedy_tokens']})", flush=True)
        gen = np.random.default_rng(1)
        from engram.config import load_config

        window = load_config(args.preset).model.max_seq_len  # a prompt plus its new tokens must fit
        prompts = {
            name: [
                gen.integers(3, vocab, min(wl["prompt_tokens"], window - wl["max_tokens"])).tolist() for _ in range(16)
            ]
            for name, wl in WORKLOADS.items()
        }
        print("part 2: offered load against engram serve (HTTP, streaming)", flush=True)
        servers: dict[str, dict[str, Any]] = {}
        cluster = None
        rows = []
        try:
            if any(w != "local" for w in args.ways):
                cluster = start_cluster(checkpoint, args.preset, tmp)
            for way in args.ways:  # every server up first; then each level runs on each way in turn
                servers[way] = start_way(way, checkpoint, args, tmp, cluster)
            for name, wl in WORKLOADS.items():
                for c in args.concurrency:
                    for way in args.ways:
                        res = asyncio.run(
                            offered_load(
                                f"http://{servers[way]['http']}/v1/completions",
                                concurrency=c,
                                requests=max(args.requests, c),
                                prompts=prompts[name],
                                max_tokens=wl["max_tokens"],
                                model="engram",
                            )
                        )
                        res["fallbacks"] = fallbacks(servers[way])
                        rows.append({"way": way, "workload": name, **res})
                        print(
                            f"  {way:<7} {name:<14} C={c:<3} {res['gen_tokens_per_s']:8.1f} gen tok/s  "
                            f"TTFT p50 {res['ttft_p50_ms']:7.1f} ms  ITL p50 {res['itl_p50_ms']:6.1f} ms  "
                            f"errors {res['errors']}" + (f"  FALLBACKS {res['fallbacks']}" if res["fallbacks"] else ""),
                            flush=True,
                        )
        finally:
            for server in servers.values():
                stop(server["proc"])
            if cluster is not None:
                cluster.stop()
    print(
        f"\n{'way':<7} {'workload':<14} {'C':>3} {'gen tok/s':>10} {'prompt tok/s':>12} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'err':>4} {'fallbk':>6}"
    )
    for r in rows:
        print(
            f"{r['way']:<7} {r['workload']:<14} {r['concurrency']:>3} {r['gen_tokens_per_s']:>10.1f} "
            f"{r['prompt_tokens_per_s']:>12.1f} {r['ttft_p50_ms']:>7.1f}ms {r['ttft_p99_ms']:>7.1f}ms "
            f"{r['itl_p50_ms']:>6.1f}ms {r['itl_p99_ms']:>6.1f}ms {r['errors']:>4} {r['fallbacks']:>6}"
        )
    over_local: dict[str, dict[str, float]] = {}
    for r in rows:
        base = next(
            (
                x
                for x in rows
                if x["way"] == "local" and x["workload"] == r["workload"] and x["concurrency"] == r["concurrency"]
            ),
            None,
        )
        if r["way"] != "local" and base is not None:
            over_local.setdefault(r["way"], {})[f"{r['workload']} C={r['concurrency']}"] = (
                r["gen_tokens_per_s"] / base["gen_tokens_per_s"] if base["gen_tokens_per_s"] else float("nan")
            )
    for way, ratios in over_local.items():
        print(f"{way} throughput / local: " + ", ".join(f"{k}: {v:.3f}" for k, v in ratios.items()))
    out = {
        "machine": machine_info(),
        "load_average_1m": os.getloadavg()[0],
        "preset": args.preset,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "kv_cache_vs_full_window": kv,
        "offered_load": rows,
        "over_local": over_local,
    }
    if args.json:
        write_report(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
