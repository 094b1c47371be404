"""Repeat the lookup benchmark and report medians and ranges: the figures the README quotes.

    python -m benchmarks.lookup_runs --runs 3 --json benchmarks/results/lookup_cpu-2core.json \
        -- --shards 1 --batches 1024,65536 --dtypes bf16 --min-reps 300 --max-reps 300

Each run is its own `python -m benchmarks.lookup` process (its own shards, Redis and baselines),
one after the other; the ratios are taken inside each run (same table, same ids, same minutes)
and only then summarised. The JSON holds every run whole (`per_run`), and `summary`: per
method and batch the median p50 with its range, per row path the issue's ratios (vs the
in-process gather, vs Redis MGET) and 1K p50 with their medians, ranges and targets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.machine import write_report


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "range": [min(values), max(values)], "per_run": values}


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-run reports of benchmarks.lookup -> medians and ranges across the runs."""
    out: dict[str, Any] = {}
    keys = sorted({(r["method"], r["dtype"], r["batch"], r.get("shards", 0)) for run in runs for r in run["results"]})
    for method, dtype, batch, shards in keys:
        p50 = [
            r["p50_ms"]
            for run in runs
            for r in run["results"]
            if (r["method"], r["dtype"], r["batch"], r.get("shards", 0)) == (method, dtype, batch, shards)
        ]
        name = f"{method} {dtype} {batch}" + (f" {shards} shard(s)" if shards else "")
        out[name] = {"p50_ms_" + k: v for k, v in spread(p50).items()} | {"runs": len(p50)}
    for path in ("shm", "tcp", "grpc"):
        per_run = [run["targets"].get(path) for run in runs]
        if not all(per_run):
            continue
        for figure in ("of_numpy", "over_redis_mget", "p50_1k_ms"):
            values = [t[figure] for t in per_run if figure in t]
            if len(values) == len(runs):
                target = per_run[0].get(f"{figure}_target")
                out[f"{path} {figure}"] = spread(values) | ({"target": target} if target is not None else {})
    return out


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n{'figure':<40} {'median':>10} {'range':>22} {'target':>8}")
    for name, s in summary.items():
        if "median" in s:
            lo, hi = s["range"]
            print(f"{name:<40} {s['median']:>10.3f} {f'[{lo:.3f}-{hi:.3f}]':>22} {s.get('target', ''):>8}")
        else:
            lo, hi = s["p50_ms_range"]
            print(f"{name + ' p50 ms':<40} {s['p50_ms_median']:>10.3f} {f'[{lo:.3f}-{hi:.3f}]':>22}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lookup_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    if "--json" in lookup_args:  # ours wherever it stands: each run's own report goes to a temporary file
        at = lookup_args.index("--json")
        own += lookup_args[at : at + 2]
        del lookup_args[at : at + 2]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="how many runs (each its own process); >= 1")
    parser.add_argument("--json", default="", help="write the runs and their summary here")
    args = parser.parse_args(own)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: must be >= 1")
    runs, started = [], time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            path = os.path.join(tmp, f"run{i}.json")
            print(f"run {i + 1} of {args.runs}: python -m benchmarks.lookup {' '.join(lookup_args)}", flush=True)
            subprocess.run([sys.executable, "-m", "benchmarks.lookup", *lookup_args, "--json", path], check=True)
            with open(path) as f:
                runs.append(json.load(f))
    summary = summarize_runs(runs)
    print_summary(summary)
    if args.json:
        report = {
            "benchmark": "lookup",
            "command": "python -m benchmarks.lookup " + " ".join(lookup_args),
            "runs": args.runs,
            "started": started,
            "summary": summary,
            "per_run": runs,
        }
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
