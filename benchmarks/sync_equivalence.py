"""Sync Ray training equals local training with the same split, over a long run.

    python -m benchmarks.sync_equivalence --preset cpu --steps 200 \\
        --json benchmarks/results/sync_equivalence_cpu-2core.json

The reference is `trainer.local` with W-way gradient accumulation (train.grad_accum=W): the
global batch split into the same W slices the W Ray workers train on, each slice's loss / W.
The distributed run: W Ray workers (1 torch thread each, gloo DDP), the tables on S real shard
processes (real redis-server), fp32 rows on the wire, sync mode. Compared step by step: the
training loss of every step, the validation losses, and every trained table row (pulled back
from the shards). The local reference runs with --threads torch threads (default 2), so the
comparison also covers a thread count other than the workers'. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import machine_info, write_report
from engram.checkpoint import load_model
from engram.config import load_config
from engram.layout import table_layouts
from services.launcher import LocalCluster
from trainer.local import train_local


def pull_tables(cfg) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    from services.client.sync import SyncShardClient

    with SyncShardClient.connect(cfg) as shards:
        return {t: shards.pull_table(t) for t in table_layouts(cfg.engram)}


def compare(
    *,
    preset: str,
    overrides: list[str],
    out_dir: Path,
    workers: int = 2,
    shards: int = 2,
    threads: int = 2,
    data: tuple | None = None,
) -> dict:
    """Local (grad_accum=workers) vs sync Ray (workers, shards) -> differences and both runs' numbers.

    Starts (and stops) a local Ray instance unless one is running already.
    """
    import ray

    from engram.data import prepare_data
    from trainer.ray_trainer import init_ray, train_ray

    base = [
        *overrides,
        "train.progress=false",
        "cluster.wire_dtype=fp32",
        "dist.mode=sync",
        f"dist.num_workers={workers}",
    ]
    local_cfg = load_config(preset, None, [*base, f"train.grad_accum={workers}", f"train.out_dir={out_dir / 'local'}"])
    data = data if data is not None else prepare_data(local_cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        local = train_local(local_cfg, data=data, label="local")
    finally:
        torch.set_num_threads(before)
    local_wall = time.perf_counter() - t0
    local_model, _, _ = load_model(local.checkpoint)
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(num_cpus=max(2, workers))
    cluster = LocalCluster(preset=preset, overrides=base, num_shards=shards, log_dir=out_dir / "cluster-logs").start()
    try:
        ray_cfg = load_config(
            preset,
            None,
            [
                *base,
                *cluster.cluster_overrides,
                f"train.out_dir={out_dir / 'ray'}",
                f"cluster.checkpoint_dir={out_dir / 'ray' / 'shards'}",
            ],
        )
        t0 = time.perf_counter()
        dist_run = train_ray(ray_cfg, data=data, label="ray-sync")
        ray_wall = time.perf_counter() - t0
        tables = pull_tables(ray_cfg)
    finally:
        cluster.stop()
        if started_ray:
            ray.shutdown()
    a, b = np.array(local.train_losses), np.array(dist_run.train_losses)
    if a.shape != b.shape:
        raise RuntimeError(f"local ran {a.size} steps, Ray {b.size}")
    val_a = np.array([v for _, v in local.val_losses])
    val_b = np.array([v for _, v in dist_run.val_losses])
    table_diff = {
        str(layer): float((rows - local_model.tables[str(layer)].weight.detach()).abs().max())  # type: ignore[operator]
        for layer, rows in tables.items()
    }
    per_step = np.abs(a - b)
    return {
        "steps": int(a.size),
        "workers": workers,
        "shards": shards,
        "local_threads": threads,
        "max_abs_train_loss_diff": float(per_step.max()),
        "first_differing_step": int(np.argmax(per_step > 0)) + 1 if (per_step > 0).any() else None,
        "steps_bit_identical": int((per_step == 0).sum()),
        "max_abs_val_loss_diff": float(np.abs(val_a - val_b).max()) if val_a.size else float("nan"),
        "max_abs_table_diff": table_diff,
        "local": {
            "final_val_loss": local.final_val_loss,
            "val_losses": local.val_losses,
            "train_losses": local.train_losses,
            "wall_s": local_wall,
        },
        "ray": {
            "final_val_loss": dist_run.final_val_loss,
            "val_losses": dist_run.val_losses,
            "train_losses": dist_run.train_losses,
            "wall_s": ray_wall,
            "staleness": dist_run.staleness,
        },
    }


def print_table(r: dict) -> None:
    names = {"local": f"local, grad_accum={r['workers']}", "ray": f"ray sync, {r['workers']}w x {r['shards']} shards"}
    print(f"\n{'run':<28} {'final val loss':>15} {'wall s':>8}")
    for key, name in names.items():
        print(f"{name:<28} {r[key]['final_val_loss']:>15.6f} {r[key]['wall_s']:>8.1f}")
    print(f"\nsteps: {r['steps']}, bit-identical training losses: {r['steps_bit_identical']}/{r['steps']}")
    print(
        f"max |train loss diff|: {r['max_abs_train_loss_diff']:.3g}   max |val loss diff|: "
        f"{r['max_abs_val_loss_diff']:.3g}   max |table diff| per layer: {r['max_abs_table_diff']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the local reference")
    p.add_argument("--out-dir", default="runs/bench-sync-equivalence")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    overrides = [f"train.steps={args.steps}", *args.overrides]
    result = compare(
        preset=args.preset,
        overrides=overrides,
        out_dir=Path(args.out_dir).resolve(),
        workers=args.workers,
        shards=args.shards,
        threads=args.threads,
    )
    print_table(result)
    report = {
        "benchmark": "sync_equivalence",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.sync_equivalence " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine_info(), "load_avg_1m": os.getloadavg()[0]},
        "preset": args.preset,
        **result,
    }
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
