"""What do remote tables cost? Inference and training with Engram rows from three places.

    python -m benchmarks.prefetch --device cpu --json benchmarks/results/prefetch_cpu-2core.json
    python -m benchmarks.prefetch --device cuda --preset small --json benchmarks/results/prefetch_h100.json

Ways, measured interleaved in one run (A B C A B C ...; medians reported, so that noise from
a shared machine hits all three alike):
  local     the table in device memory (the model's own `LocalEngramTable`)
  prefetch  remote shards (real processes via `LocalCluster`), lookups issued as soon as the
            ids are known (`PrefetchPipeline`); prefill and training also prefetch the *next*
            batch while the current one computes, as a serving queue or a data loader allows
  sync      remote shards, each layer's lookup issued when the layer is reached
  cached    prefetch plus a hot-row cache (`worker.cache`, --cache-mb) in front of the shards
            (inference only: frozen tables); decode then fetches only the new token's rows

Token ids are Zipf-distributed (a=1.2 over a fixed permutation of the vocabulary), fresh for
every repetition. Workloads: prefill (one forward pass over a (B, T) batch, tokens/s), decode (greedy, one
token per step for B sequences, full-window forward each step since the model has no KV
cache, tokens/s), training step (forward + backward of the model incl. row gradients;
pushing the row gradients to the shards and the dense optimizer are not timed). Because nothing
is pushed, prefetching the next training batch is exact here; with pushes it reads rows one
update old, i.e. it is the async mode (staleness 1) -- sync mode can only overlap within a step.
Before timing, logits of each remote way are checked against the local table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.machine import machine_info
from engram.config import Config, load_config
from engram.indexer import to_device
from engram.model import EngramLM
from engram.precision import configure_tf32
from worker.cache import HotRowCache
from worker.prefetch import PrefetchPipeline

WAYS = ("local", "prefetch", "sync", "cached")
TRAIN_WAYS = ("local", "prefetch", "sync")  # a training cache needs the staleness protocol; not timed here
DEFAULTS = {  # device -> preset, batch, seq, decode batch, prompt, new tokens
    "cpu": dict(preset="cpu", batch=8, seq=64, decode_batch=4, prompt=32, new_tokens=4, cache_mb=4.0),
    "cuda": dict(preset="small", batch=32, seq=256, decode_batch=32, prompt=128, new_tokens=32, cache_mb=256.0),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], int], device: torch.device) -> tuple[float, int]:
    sync(device)
    t0 = time.perf_counter()
    n = fn()
    sync(device)
    return time.perf_counter() - t0, n


class Bench:
    def __init__(self, model: EngramLM, pipes: dict[str, PrefetchPipeline], args: argparse.Namespace) -> None:
        self.model, self.pipes, self.args = model, pipes, args
        self.device = next(model.parameters()).device
        self.new_data(0)

    def tokens(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Zipf-distributed ids (a=1.2), like text: a few tokens (and n-grams) are most of the traffic.

        On the CPU, as a data loader holds them: the indices are computed from these (no sync);
        `dev` gives the model's copy."""
        V = self.model.cfg.model.vocab_size
        ranks = np.minimum(self.rng.zipf(1.2, size=shape), V) - 1
        return torch.from_numpy(self.perm[ranks])

    def dev(self, ids: torch.Tensor) -> torch.Tensor:
        return to_device(ids, self.device)

    def new_data(self, rep: int) -> None:
        """Fresh batches per repetition (the same for every way), so a cache cannot replay a repeat."""
        self.rng = np.random.default_rng(rep)
        self.perm = np.random.default_rng(12345).permutation(self.model.cfg.model.vocab_size)
        a = self.args
        self.prefill = [self.tokens((a.batch, a.seq)) for _ in range(a.batches)]
        self.prompts = self.tokens((a.decode_batch, a.prompt))
        self.train = [(self.tokens((a.batch, a.seq)), self.tokens((a.batch, a.seq))) for _ in range(a.batches)]

    def rows_for(self, way: str, ids: torch.Tensor, ahead: object = None):  # type: ignore[no-untyped-def]
        if way == "local":
            return None  # the model looks rows up in its own tables
        if ahead is not None:
            return ahead.lazy()  # type: ignore[attr-defined]
        if way not in self.pipes:
            return None
        return self.pipes[way].engram_rows(ids)

    @torch.inference_mode()
    def run_prefill(self, way: str) -> int:
        ahead_ways = ("prefetch", "cached")
        pipe, ahead = (self.pipes[way] if way in ahead_ways else None), None
        if pipe is not None:
            ahead = pipe.prefetch(self.prefill[0])
        for i, ids in enumerate(self.prefill):
            rows = self.rows_for(way, ids, ahead)
            if pipe is not None and i + 1 < len(self.prefill):
                ahead = pipe.prefetch(self.prefill[i + 1])  # the next batch's rows fly meanwhile
            self.model(self.dev(ids), engram_rows=rows, ids_cpu=ids)
        return sum(x.numel() for x in self.prefill)

    @torch.inference_mode()
    def run_decode(self, way: str) -> int:
        ids, ids_dev = self.prompts, self.dev(self.prompts)
        for _ in range(self.args.new_tokens):
            logits, _ = self.model(ids_dev, engram_rows=self.rows_for(way, ids), ids_cpu=ids)
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            ids_dev = torch.cat([ids_dev, token], dim=1)  # (B, t + 1)
            ids = torch.cat([ids, token.cpu()], dim=1)  # a server returns each token: one read per step
        return self.args.decode_batch * self.args.new_tokens

    def run_train(self, way: str) -> int:
        pipe, ahead = (self.pipes[way] if way == "prefetch" else None), None
        if pipe is not None:
            ahead = pipe.prefetch(self.train[0][0])
        for i, (x, y) in enumerate(self.train):
            rows = self.rows_for(way, x, ahead)
            if pipe is not None and i + 1 < len(self.train):
                ahead = pipe.prefetch(self.train[i + 1][0])  # the loader knows the next batch already
            _, loss = self.model(self.dev(x), self.dev(y), engram_rows=rows, ids_cpu=x)
            loss.backward()
            self.model.zero_grad(set_to_none=True)
        return len(self.train)

    @torch.inference_mode()
    def check(self, way: str) -> float:
        ids = self.prefill[0]
        ref, _ = self.model(self.dev(ids), ids_cpu=ids)
        out, _ = self.model(self.dev(ids), engram_rows=self.pipes[way].engram_rows(ids))
        return float((out.float() - ref.float()).abs().max())


def build(args: argparse.Namespace) -> tuple[Config, EngramLM, torch.device]:
    overrides = [f"cluster.wire_dtype={args.wire}", f"cluster.num_shards={args.shards}", *args.overrides]
    cfg = load_config(args.preset, None, overrides)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = EngramLM(cfg, np.arange(cfg.model.vocab_size)).to(device)
    configure_tf32(device, cfg.train.tf32)
    return cfg, model, device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", default=None, help="default: cpu on --device cpu, small on cuda")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument(
        "--cache-mb", type=float, default=None, help="hot-row cache of the 'cached' way (cpu 4, cuda 256)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the model (cpu default 1: the shards need the other core)",
    )
    parser.add_argument("--wire", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--decode-batch", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--batches", type=int, default=3, help="batches per prefill / training repetition")
    parser.add_argument("--repeats", type=int, default=25, help="interleaved repetitions per way")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)

    from services.launcher import LocalCluster
    from worker.runtime import remote_source

    cfg, model, device = build(args)
    load_before = os.getloadavg()
    with LocalCluster(
        cfg, preset=args.preset, overrides=[f"cluster.wire_dtype={args.wire}", *args.overrides], num_shards=args.shards
    ) as cluster:
        remote_cfg = load_config(
            args.preset, None, [f"cluster.wire_dtype={args.wire}", *args.overrides, *cluster.cluster_overrides]
        )
        sources = {way: remote_source(remote_cfg, device) for way in ("prefetch", "sync")}
        assert model.indexer is not None, "the benchmark needs an Engram model"
        cache = HotRowCache(
            capacity_bytes=int(args.cache_mb * (1 << 20)),
            device=device,
            dims={layer: lay.dim for layer, lay in model.indexer.layouts.items()},
        )
        timeout_s = remote_cfg.cluster.lookup_timeout_s
        pipes = {
            "prefetch": PrefetchPipeline(model, sources["prefetch"], timeout_s=timeout_s),
            "sync": PrefetchPipeline(model, sources["sync"], prefetch=False, timeout_s=timeout_s),
            "cached": PrefetchPipeline(model, sources["prefetch"], cache=cache, timeout_s=timeout_s),
        }
        train_pipes = {
            way: PrefetchPipeline(model, src, prefetch=way == "prefetch", train=True, timeout_s=timeout_s)
            for way, src in sources.items()
        }
        bench = Bench(model, pipes, args)
        errors = {way: bench.check(way) for way in pipes}
        print("max |logits - local| :", {k: f"{v:.2e}" for k, v in errors.items()})
        samples: dict[str, dict[str, list[float]]] = {w: {"prefill": [], "decode": [], "train": []} for w in WAYS}

        def measure(way: str, record: bool) -> None:
            bench.pipes = pipes
            dt, n = timed(lambda: bench.run_prefill(way), device)
            if record:
                samples[way]["prefill"].append(n / dt)
            dt, n = timed(lambda: bench.run_decode(way), device)
            if record:
                samples[way]["decode"].append(n / dt)
            if way in TRAIN_WAYS:
                bench.pipes = train_pipes
                dt, n = timed(lambda: bench.run_train(way), device)
                if record:
                    samples[way]["train"].append(1000 * dt / n)

        for way in WAYS:  # warm-up (first autograd passes are slow; the cache fills here)
            measure(way, record=False)
        cache.reset_stats()
        for rep in range(args.repeats):
            bench.new_data(rep + 1)
            for k in range(len(WAYS)):  # rotate the order, so no way always runs right after another
                measure(WAYS[(rep + k) % len(WAYS)], record=True)
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
        cache_stats = cache.stats()
        print(f"hot-row cache: {args.cache_mb:g} MB, hit rate {100 * cache_stats.hit_rate:.1f}%")
        for src in sources.values():
            src.close()
    results = {
        way: {k: statistics.median(v) if v else float("nan") for k, v in s.items()} for way, s in samples.items()
    }
    cost = overheads(samples)
    report(results, cost)
    if args.json:
        out = {
            "benchmark": "prefetch",
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": {
                **machine_info(),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
            },
            "device": str(device),
            "preset": args.preset,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "units": {"prefill": "tokens/s", "decode": "tokens/s", "train": "ms/step (fwd+bwd)"},
            "max_abs_logit_diff_vs_local": errors,
            "median": results,
            "samples": samples,
            "cache_hit_rate": cache_stats.hit_rate,
            "overhead_vs_local_pct": cost,
            "overhead_method": "median over repetitions of (way / local of the same repetition)",
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(no_nan(out), indent=2))
        print("wrote", args.json)
    return 0


def no_nan(x: Any) -> Any:
    """NaN (a way that was not measured) -> null, so the file is strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [no_nan(v) for v in x]
    return x


def overheads(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Cost against the local table in percent (throughput lost, or step time added): the median
    over repetitions of the ratio to the local table's sample *of the same repetition*, which
    cancels most of the load drift of a shared machine."""
    base = samples["local"]
    out = {}
    for way in WAYS[1:]:
        r = samples[way]
        c: dict[str, Any] = {}  # percent, plus the interquartile range of the paired ratios
        for key, sign in (("prefill", -1), ("decode", -1), ("train", 1)):
            if not r[key]:
                c[key] = float("nan")
                continue
            ratios = [x / b for x, b in zip(r[key], base[key])]
            c[key] = 100 * sign * (statistics.median(ratios) - 1)
            if len(ratios) >= 4:  # spread of the paired ratios: how far to trust the median
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                c[key + "_iqr"] = sorted([100 * sign * (q1 - 1), 100 * sign * (q3 - 1)])
        out[way] = c
    return out


def report(results: dict[str, dict[str, float]], cost: dict[str, dict[str, Any]]) -> None:
    print(
        f"\n{'way':<10} {'prefill tok/s':>14} {'decode tok/s':>13} {'train ms/step':>14}   "
        "cost vs local (median of paired ratios)"
    )
    for way in WAYS:
        r = results[way]
        extra = ""
        if way in cost:
            c = cost[way]
            extra = f"   prefill {c['prefill']:+.1f}%  decode {c['decode']:+.1f}%"
            extra += f"  train {c['train']:+.1f}%" if c["train"] == c["train"] else ""
        print(f"{way:<10} {r['prefill']:>14,.0f} {r['decode']:>13,.1f} {r['train']:>14.1f}{extra}")


if __name__ == "__main__":
    raise SystemExit(main())
