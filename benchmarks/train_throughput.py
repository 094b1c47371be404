"""Training throughput of the real trainers: local (tables in the model) vs `train_ray`
(2 Ray workers, tables on 2 shard processes), and how long the Ray workers are blocked on the shards.

    python -m benchmarks.train_throughput --preset cpu --steps 100 --rounds 3 --modes sync \\
        --no-prefetch --json benchmarks/results/train_throughput_cpu-2core.json

Same config, data and global batch for every run; runs are interleaved (local, sync, async,
local, ...) so a noisy machine affects all of them alike. tokens/s is measured inside the
training loop (rank 0 for Ray: every step's global batch over the loop's wall time, which
includes the final validation pass, as the local trainer's number does); Ray and cluster
start-up are excluded and reported separately. "blocked" is the trainer's own timing
(trainer/remote_step.py): the time a worker's training thread waits for rows and for its
pushes to be answered, as a fraction of the training loop's wall time (mean over workers).
`--no-prefetch` adds runs with dist.prefetch=false (rows looked up when the step needs them),
side by side. Every process uses --threads torch threads (default 1: on a small shared box,
2-thread torch in one process was measured 14x slower than 1-thread). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info, write_report
from engram.config import load_config
from engram.data import prepare_data
from services.launcher import LocalCluster
from trainer.local import train_local


def run(args: argparse.Namespace) -> dict:
    import ray

    from trainer.ray_trainer import init_ray, train_ray

    out = Path(args.out_dir).resolve()
    base = [
        f"train.steps={args.steps}",
        f"train.eval_every={args.steps}",
        "train.progress=false",
        f"cluster.wire_dtype={args.wire}",
        f"dist.num_workers={args.workers}",
        *args.overrides,
    ]
    cfg0 = load_config(args.preset, None, base)
    data = prepare_data(cfg0)
    torch.set_num_threads(args.threads)  # local run; each Ray worker gets the same count
    init_ray(num_cpus=args.ray_cpus)
    variants = [(f"ray-{m}", m, True) for m in args.modes]
    if args.no_prefetch:
        variants += [(f"ray-{m}-noprefetch", m, False) for m in args.modes]
    runs: dict[str, list[dict]] = {"local": [], **{name: [] for name, _, _ in variants}}
    try:
        for r in range(args.rounds):
            cfg = load_config(args.preset, None, [*base, f"train.out_dir={out / f'local-{r}'}"])
            res = train_local(cfg, data=data, label="local")
            runs["local"].append({"tokens_per_s": res.tokens_per_s, "final_val_loss": res.final_val_loss})
            print(f"round {r} local: {res.tokens_per_s:,.0f} tok/s", flush=True)
            for name, mode, prefetch in variants:
                t0 = time.perf_counter()
                cluster = LocalCluster(
                    cfg, preset=args.preset, overrides=base, num_shards=args.shards, log_dir=out / f"logs-{name}-{r}"
                ).start()
                t_cluster = time.perf_counter() - t0
                try:
                    cfg = load_config(
                        args.preset,
                        None,
                        [
                            *base,
                            *cluster.cluster_overrides,
                            f"dist.mode={mode}",
                            f"dist.prefetch={str(prefetch).lower()}",
                            f"train.out_dir={out / f'{name}-{r}'}",
                            f"cluster.checkpoint_dir={out / f'{name}-{r}' / 'shards'}",
                        ],
                    )
                    t1 = time.perf_counter()
                    dist_res = train_ray(cfg, data=data, label=name, torch_threads=args.threads)
                    wall = time.perf_counter() - t1
                finally:
                    cluster.stop()
                runs[name].append(
                    {
                        "tokens_per_s": dist_res.tokens_per_s,
                        "final_val_loss": dist_res.final_val_loss,
                        "blocked_fraction": dist_res.timings["blocked_fraction"],
                        "staleness": dist_res.staleness,
                        "timings_s": dist_res.timings,
                        "cluster_start_s": t_cluster,
                        "ray_run_wall_s": wall,
                        "load_avg_1m": os.getloadavg()[0],
                    }
                )
                print(
                    f"round {r} {name}: {dist_res.tokens_per_s:,.0f} tok/s, blocked on the shards "
                    f"{100 * dist_res.timings['blocked_fraction']:.1f}% (staleness max {dist_res.staleness.get('max')})",
                    flush=True,
                )
    finally:
        ray.shutdown()
    summary = {name: float(np.median([x["tokens_per_s"] for x in xs])) for name, xs in runs.items()}
    blocked = {
        name: float(np.median([x["blocked_fraction"] for x in xs])) for name, xs in runs.items() if name != "local"
    }

    def med(xs: list[dict], key: str) -> float:
        return float(np.median([x["timings_s"][key] for x in xs]))

    print(
        f"\n{'run':<22} {'tokens/s (median)':>18} {'vs local':>9} {'val loss':>9} {'blocked':>8} "
        f"{'lookup s':>9} {'push s':>7} {'loop s':>7}"
    )
    for name, xs in runs.items():
        extra = (
            f"{100 * blocked[name]:>7.1f}% {med(xs, 'lookup'):>9.2f} {med(xs, 'push'):>7.2f} {med(xs, 'wall'):>7.1f}"
            if name in blocked
            else f"{'-':>8} {'-':>9} {'-':>7} {'-':>7}"
        )
        print(
            f"{name:<22} {summary[name]:>18,.0f} {summary[name] / summary['local']:>8.2f}x "
            f"{np.median([x['final_val_loss'] for x in xs]):>9.4f} {extra}"
        )
    return {
        "benchmark": "train_throughput",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {**machine_info(), "host_cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "command": args.command,
        "preset": args.preset,
        "steps": args.steps,
        "rounds": args.rounds,
        "workers": args.workers,
        "shards": args.shards,
        "wire_dtype": args.wire,
        "torch_threads": args.threads,
        "global_batch_tokens": cfg0.train.batch_size * cfg0.train.seq_len,
        "median_tokens_per_s": summary,
        "median_blocked_fraction": blocked,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    p.add_argument(
        "--no-prefetch", action="store_true", help="also run each mode with dist.prefetch=false, side by side"
    )
    p.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the local process and of each Ray worker (an oversubscribed box "
        "runs 2-thread torch far slower than 1-thread)",
    )
    p.add_argument("--ray-cpus", type=int, default=None, help="num_cpus for the local Ray instance")
    p.add_argument("--out-dir", default="runs/bench-train-throughput")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.command = "python -m benchmarks.train_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    result = run(args)
    if args.json:
        write_report(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
