"""`engram bench NAME [args...]`: run benchmarks/NAME.py's main with the remaining arguments.

    engram bench lookup --quick --json benchmarks/results/lookup_cpu-2core.json
    engram bench quality --preset cpu
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "lookup": "lookup latency and throughput: shards vs in-process numpy vs Redis MGET",
    "quality": "validation loss with and without Engram",
    "prefetch": "how much of the lookup the prefetcher hides",
    "table_scaling": "validation loss vs number of Engram table rows at fixed compute",
    "ngram_stats": "n-gram Zipf exponents of the corpus (the capacity planner's statistic)",
    "serve": "engram serve under offered load: throughput, TTFT, inter-token latency; KV cache vs full window",
}


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"benchmarks.{args.name}":
            raise
        print(f"engram bench: benchmarks/{args.name}.py is not in this checkout")
        return 2
    return int(module.main(list(args.args)) or 0)
