"""Soak: sync training for `--minutes` while shard 1 is killed (-9) and restarted every `--every-s` (R=2).

    python -m benchmarks.soak --json benchmarks/results/soak_cpu-2core.json      # ~3 min + the reference run

Not in CI. Real processes (LocalCluster). One worker trains the tiny preset with the tables on
2 shards, R=2; shard 1 is killed and restarted every `--every-s` seconds (it rejoins empty and
is rebuilt from shard 0). When the time is up the training stops at its step S; a second,
unfaulted cluster trains the same S steps. Reported: the final weights' max abs difference
(no update lost: <= 1e-6), faults injected, repairs seen, and the RSS of the process that
lives through every fault (shard 0) and of this client, from the end of the first fault cycle
to the end (growth < 5% is the target).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.fault_harness import KillRestart, events, fully_replicated, train_remote, wait_for
from benchmarks.machine import machine_info, write_report
from engram.config import load_config
from engram.data import prepare_data
from services.launcher import LocalCluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--every-s", type=float, default=30.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from engram.corpus import write_code_corpus

    report: dict[str, Any] = {"machine": machine_info(), "minutes": args.minutes, "every_s": args.every_s}
    with tempfile.TemporaryDirectory(prefix="engram-soak-") as tmp:
        root = Path(tmp)
        write_code_corpus(root / "corpus.txt")
        base = [
            f'train.corpus=["{root / "corpus.txt"}"]',
            f"tokenizer.cache_dir={root / 'cache'}",
            "train.progress=false",
            "cluster.wire_dtype=fp32",
            "train.steps=1000000",
            "train.warmup_steps=10",
        ]
        data = prepare_data(load_config("tiny", None, base))
        state: dict[str, Any] = {"faults": 0, "rss": []}
        cluster = LocalCluster(
            preset="tiny",
            overrides=base,
            num_shards=2,
            replicas=2,
            log_dir=root / "soak-logs",
            startup_timeout_s=120,
            shard_args=["--threads", "2"],
        )
        with cluster:
            cfg = load_config("tiny", None, [*base, *cluster.cluster_overrides])
            survivor, me = psutil.Process(cluster.shards[0].pid), psutil.Process()
            t_start = time.monotonic()
            faults = KillRestart(cluster, 1)

            def sample(now: float) -> None:
                state["rss"].append((round(now - t_start, 1), survivor.memory_info().rss, me.memory_info().rss))

            on_step = faults.every(args.every_s, until=t_start + 60 * args.minutes, on_fault=sample)
            losses, _, rows = train_remote(cfg, data, steps=10**6, on_step=on_step)
            state["faults"] = faults.restarts
            try:
                wait_for("R holders", lambda: fully_replicated(cluster, {0, 1}), timeout_s=120)
                applied = min(rows.applied_steps().values())
                faulted = {t: rows.pull_table(t) for t in cfg.engram.layer_ids}
            finally:
                rows.close()
            state["rss"].append(
                (round(time.monotonic() - t_start, 1), survivor.memory_info().rss, me.memory_info().rss)
            )
            kinds = [e["kind"] for e in events(cluster)]
        ref = LocalCluster(
            preset="tiny",
            overrides=base,
            num_shards=2,
            replicas=2,
            log_dir=root / "ref-logs",
            startup_timeout_s=120,
            shard_args=["--threads", "2"],
        )
        with ref:
            rcfg = load_config("tiny", None, [*base, *ref.cluster_overrides])
            _, _, rows = train_remote(rcfg, data, steps=applied)
            try:
                clean = {t: rows.pull_table(t) for t in rcfg.engram.layer_ids}
            finally:
                rows.close()
    diff = max(float((faulted[t] - clean[t]).abs().max()) for t in clean)
    rss = state["rss"]
    first, last = rss[0] if rss else (0, 1, 1), rss[-1] if rss else (0, 1, 1)
    report.update(
        steps=applied,
        steps_run=len(losses),
        faults=state["faults"],
        repairs=kinds.count("repaired"),
        failovers=kinds.count("failover"),
        final_tables_max_abs_diff=diff,
        no_update_lost=diff <= 1e-6,
        rss_samples=rss,
        shard0_rss_growth=(last[1] - first[1]) / first[1],
        client_rss_growth=(last[2] - first[2]) / first[2],
        load_avg_end=os.getloadavg(),
    )
    print(
        f"soak {args.minutes:g} min, kill -9 + restart every {args.every_s:g} s: {state['faults']} faults, "
        f"{report['failovers']} failovers, {report['repairs']} repairs, {applied} steps"
    )
    print(f"  final tables vs unfaulted: max|diff| {diff:.2e} -> no update lost: {diff <= 1e-6}")
    print(
        f"  RSS growth from the first fault to the end: shard 0 {100 * report['shard0_rss_growth']:+.2f}%, "
        f"client {100 * report['client_rss_growth']:+.2f}%  (load avg {report['load_avg_end']})"
    )
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
