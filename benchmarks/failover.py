"""Failover benchmark: kill -9 and SIGSTOP a shard under lookup load and during sync training (R=2).

    python -m benchmarks.failover --json benchmarks/results/failover_cpu-2core.json

Real processes (LocalCluster: redis-server with AOF, `python -m services.shard`), default
failure detection (cluster.heartbeat_s=0.5, heartbeat_ttl_s=2, failover_check_s=0.25).

1. Lookup load: one client thread looks up `--rows` random rows of one table without pause
   (TCP data plane: a stopped shard's shared memory would still answer). For each fault,
   kill -9 shard 1 / SIGSTOP shard 0, then restart it / SIGCONT it once the fault was
   detected. Reported: failed requests, detect time (fault -> the leader wrote the new map),
   promote time (fault -> the survivor serves at the new epoch), time until every slot has R
   holders again, lookup p50/p99 in the window fault -> R restored, and before the fault.
2. Sync training (tiny preset, `--steps` steps, one worker): an unfaulted run, a run with
   kill -9 of shard 1 at step 1/3 and its restart at 2/3, and a run with SIGSTOP of shard 1
   (SIGCONT at 2/3). Reported: final tables and dense weights equal to the unfaulted run
   (max abs difference), the replicas byte-identical, and the wall time of each run.

Bounded: every wait has a deadline; a fault that is not repaired in `--wait-s` is reported as such.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.fault_harness import (
    LookupLoad,
    events,
    fully_replicated,
    holder_rows,
    p99,
    slot_map,
    train_remote,
    wait_for,
)
from benchmarks.machine import machine_info, write_report
from engram.config import load_config
from engram.data import prepare_data
from engram.layout import table_layouts
from services.launcher import LocalCluster


def one_fault(
    cluster: LocalCluster, load: LookupLoad, *, kind: str, victim: int, survivor: int, wait_s: float
) -> dict[str, Any]:
    before = slot_map(cluster)
    n_events = len(events(cluster))
    failed0 = load.failed
    t_base = time.monotonic() - 3.0
    pid = cluster.shards[victim].pid
    t0_wall, t0 = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    out: dict[str, Any] = {"fault": f"{'kill -9' if kind == 'kill' else 'SIGSTOP'} shard {victim}"}
    try:
        smap = wait_for(
            "failover",
            lambda: (m := slot_map(cluster)).epoch > before.epoch and victim not in m.all_holders() and m,
            timeout_s=wait_s,
            every_s=0.02,
        )
        t_seen = time.monotonic()
        new = [e for e in events(cluster)[n_events:] if e["kind"] == "failover"]
        out["detect_s"] = round(new[0]["t"] - t0_wall, 3) if new else round(t_seen - t0, 3)
        out["map_seen_s"] = round(t_seen - t0, 3)
        try:
            from services.client.sync import SyncShardClient

            cfg = load.cfg
            with SyncShardClient.connect(cfg) as rows:
                wait_for(
                    "the survivor at the new epoch",
                    lambda: int(rows.call(rows.client.stats([survivor]))[survivor].epoch) >= smap.epoch,
                    timeout_s=wait_s,
                    every_s=0.02,
                )
            out["promote_s"] = round(time.monotonic() - t0, 3)
        except Exception as exc:  # noqa: BLE001 - reported
            out["promote_s"] = None
            out["promote_error"] = repr(exc)[:200]
    finally:
        if kind == "kill":
            cluster.add_shard(victim)
        else:
            os.kill(pid, signal.SIGCONT)
    try:
        wait_for(
            "R holders again", lambda: fully_replicated(cluster, {victim, survivor}), timeout_s=wait_s, every_s=0.05
        )
        out["r_restored_s"] = round(time.monotonic() - t0, 3)
    except TimeoutError:
        out["r_restored_s"] = None
    t_end = time.monotonic()
    load.wait_more(3)
    out["failed_requests"] = load.failed - failed0
    during = load.latencies(t0, t_end)
    base = load.latencies(t_base, t0)
    out.update(
        lookups_during=len(during),
        p50_during_ms=round(1e3 * float(np.median(during)), 2) if during else None,
        p99_during_ms=round(1e3 * p99(during), 2),
        p99_before_ms=round(1e3 * p99(base), 2),
    )
    return out


def lookup_faults(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    over = ["cluster.row_path=tcp", "cluster.wire_dtype=bf16"]
    cluster = LocalCluster(
        preset=args.preset,
        overrides=over,
        num_shards=2,
        replicas=2,
        log_dir=root / "lookup-logs",
        startup_timeout_s=120,
    )
    with cluster:
        cfg = load_config(args.preset, None, [*over, *cluster.cluster_overrides])
        table, layout = next(iter(table_layouts(cfg.engram).items()))
        ids = np.random.default_rng(0).choice(layout.num_rows, size=min(args.rows, layout.num_rows), replace=False)
        with LookupLoad(cfg, table, ids.astype(np.int64)) as load:
            load.wait_more(10)
            time.sleep(3.0)  # a baseline window
            results = [one_fault(cluster, load, kind="kill", victim=1, survivor=0, wait_s=args.wait_s)]
            time.sleep(2.0)
            results.append(one_fault(cluster, load, kind="stop", victim=0, survivor=1, wait_s=args.wait_s))
            total = {
                "lookups_ok": load.ok,
                "lookups_failed": load.failed,
                "errors": load.errors[:5],
                "replica_switches": load.client.replica_switches if load.client else None,
            }
    return {"rows_per_lookup": int(ids.size), "faults": results, **total}


def training_faults(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from engram.corpus import write_code_corpus

    write_code_corpus(root / "corpus.txt")
    steps = args.steps
    base = [
        f'train.corpus=["{root / "corpus.txt"}"]',
        f"tokenizer.cache_dir={root / 'cache'}",
        "train.progress=false",
        "cluster.wire_dtype=fp32",
        f"train.steps={steps}",
    ]
    data = prepare_data(load_config("tiny", None, base))
    runs: dict[str, Any] = {}
    for name in ("clean", "kill", "stop"):
        cluster = LocalCluster(
            preset="tiny",
            overrides=base,
            num_shards=2,
            replicas=2,
            log_dir=root / f"{name}-logs",
            startup_timeout_s=120,
            shard_args=["--threads", "2"],
        )
        with cluster:
            cfg = load_config("tiny", None, [*base, *cluster.cluster_overrides])
            timers: list[threading.Timer] = []
            pid = cluster.shards[1].pid

            def fault(step0: int, *, name=name, cluster=cluster, pid=pid, timers=timers) -> None:
                if step0 == steps // 3:
                    sig = signal.SIGKILL if name == "kill" else signal.SIGSTOP
                    timers.append(threading.Timer(0.01, os.kill, (pid, sig)))
                    timers[-1].start()
                if step0 == 2 * steps // 3:
                    if name == "kill":
                        cluster.add_shard(1)
                    else:
                        os.kill(pid, signal.SIGCONT)

            t0 = time.monotonic()
            losses, dense, rows = train_remote(cfg, data, steps=steps, on_step=None if name == "clean" else fault)
            wall = time.monotonic() - t0
            try:

                def replicated(c: LocalCluster = cluster) -> Any:
                    return fully_replicated(c, {0, 1})

                smap = wait_for("R holders", replicated, timeout_s=args.wait_s)
                tables = {t: rows.pull_table(t) for t in cfg.engram.layer_ids}
                addresses = rows.client.addresses
                same = all(
                    torch.equal(
                        holder_rows(cfg, smap, addresses, shard_id=0, table=t, n=tables[t].shape[0]),
                        holder_rows(cfg, smap, addresses, shard_id=1, table=t, n=tables[t].shape[0]),
                    )
                    for t in cfg.engram.layer_ids
                )
            finally:
                rows.close()
            runs[name] = {
                "losses": losses,
                "dense": dense,
                "tables": tables,
                "wall_s": round(wall, 2),
                "replicas_identical": same,
                "events": [e["kind"] for e in events(cluster)],
            }
    clean = runs["clean"]
    out: dict[str, Any] = {"steps": steps}
    for name in ("clean", "kill", "stop"):
        r = runs[name]
        diff = max(
            [float((r["tables"][t] - clean["tables"][t]).abs().max()) for t in clean["tables"]]
            + [float((r["dense"][k] - v).abs().max()) for k, v in clean["dense"].items()]
        )
        out[name] = {
            "wall_s": r["wall_s"],
            "final_weights_max_abs_diff": diff,
            "final_weights_equal": diff <= 1e-6,
            "replicas_identical": r["replicas_identical"],
            "events": r["events"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--rows", type=int, default=4096, help="rows per lookup of the steady load")
    p.add_argument("--steps", type=int, default=30, help="sync training steps per run")
    p.add_argument("--wait-s", type=float, default=60.0, help="deadline of every wait")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "machine": machine_info(),
        "replicas": 2,
        "shards": 2,
        "note": "a shared 2-core box: numbers taken under other jobs' load (load_avg)",
    }
    with tempfile.TemporaryDirectory(prefix="engram-failover-") as tmp:
        report["lookups"] = lookup_faults(args, Path(tmp))
        if not args.skip_training:
            report["training"] = training_faults(args, Path(tmp))
    report["load_avg_end"] = os.getloadavg()
    print(
        f"\nfailover (R=2, 2 shards, default detection), load avg {report['machine']['load_avg_start']} -> "
        f"{tuple(round(x, 2) for x in report['load_avg_end'])}"
    )
    print(
        f"{'fault':<18}{'failed':>8}{'detect s':>10}{'promote s':>11}{'R again s':>11}{'p99 before':>12}"
        f"{'p99 during':>12}"
    )
    for f in report["lookups"]["faults"]:
        print(
            f"{f['fault']:<18}{f['failed_requests']:>8}{f.get('detect_s')!s:>10}{f.get('promote_s')!s:>11}"
            f"{f.get('r_restored_s')!s:>11}{f['p99_before_ms']:>10}ms{f['p99_during_ms']:>10}ms"
        )
    if "training" in report:
        tr = report["training"]
        print(f"\nsync training, {tr['steps']} steps: fault -> final weights vs the unfaulted run")
        for name in ("clean", "kill", "stop"):
            r = tr[name]
            print(
                f"  {name:<6} equal={r['final_weights_equal']!s:<6} max|diff|={r['final_weights_max_abs_diff']:.2e} "
                f"replicas identical={r['replicas_identical']!s:<6} wall {r['wall_s']} s"
            )
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
