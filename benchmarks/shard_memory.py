"""Shard memory: resident size of one real shard process vs the bytes it must hold.

Starts `python -m services.shard --standalone` holding one ~`--gib` GiB fp32 table (64-dim
rows, all slots on the one shard) for each optimizer, and reports

    ratio = RSS / (weights + optimizer state + mirror)        target: <= 1.15 for a 2 GiB table

(the mirror: the bf16/fp16 copy of the weights a shard keeps with cluster.row_mirror; the
weights and mirror live in files under cluster.shm_dir, which RSS counts once touched)

at three points: READY, after `--lookups` 64K-row bf16 Lookups, and after `--updates`
ApplyGradients of 16K rows (which exercise the gather/update temporaries), plus the peak
during that traffic and the settled value a few seconds later. The lookup
latency of the same run is reported too (loopback, one client, sequential calls).

    python benchmarks/shard_memory.py --json benchmarks/results/shard_memory_cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proto.shard.v1 import shard_pb2, shard_pb2_grpc  # noqa: E402

HEADS, DIM = 8, 64  # per n-gram order; 2 orders -> 16 heads of 64-dim rows


def shard_args(gib: float, optimizer: str) -> list[str]:
    rows_per_head = int(gib * (1 << 30) / (4 * DIM) / (2 * HEADS))
    return [
        "--preset",
        "tiny",
        "--standalone",
        "--shard-id",
        "0",
        "--set",
        "engram.layer_ids=[1]",
        "--set",
        f"engram.n_head_per_ngram={HEADS}",
        "--set",
        f"engram.n_embed_per_ngram={HEADS * DIM}",
        "--set",
        f"engram.table_size_per_ngram=[{rows_per_head},{rows_per_head}]",
        "--set",
        "cluster.num_shards=1",
        "--set",
        "cluster.num_slots=256",
        "--set",
        f"cluster.optimizer={optimizer}",
        "--log-level",
        "WARNING",
    ]


def run_one(gib: float, optimizer: str, *, lookups: int, lookup_rows: int, updates: int, settle_s: float) -> dict:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.shard", *shard_args(gib, optimizer)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"shard did not start (exit {proc.wait()})")
        boot_s = time.monotonic() - t0
        address = line.split("address=")[1].strip()
        channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
        stub = shard_pb2_grpc.MemoryShardStub(channel)
        ps = psutil.Process(proc.pid)

        def rss() -> int:
            return ps.memory_info().rss

        stats = stub.Stats(shard_pb2.StatsRequest(), timeout=30)
        table = stats.tables[0]
        held = table.weight_bytes + table.state_bytes + table.mirror_bytes
        out = {
            "optimizer": optimizer,
            "rows": table.num_rows,
            "dim": table.dim,
            "weight_bytes": table.weight_bytes,
            "state_bytes": table.state_bytes,
            "mirror_bytes": table.mirror_bytes,
            "boot_s": round(boot_s, 2),
            "rss_ready": rss(),
        }
        rng = np.random.default_rng(0)
        lat, peak = [], out["rss_ready"]
        for _ in range(lookups):
            packed = rng.integers(0, table.num_rows, lookup_rows, dtype=np.int64).tobytes()
            req = shard_pb2.LookupRequest(table=table.table, epoch=1, row_ids=packed, dtype=shard_pb2.BF16)
            t = time.perf_counter()
            resp = stub.Lookup(req, timeout=60)
            lat.append(time.perf_counter() - t)
            assert len(resp.rows) == lookup_rows * DIM * 2
            peak = max(peak, rss())
        out["rss_after_lookups"] = rss()
        opt = shard_pb2.OptimizerParams(kind=optimizer, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
        for step in range(1, updates + 1):
            ids = rng.choice(table.num_rows, 16384, replace=False).astype(np.int64)
            grads = rng.standard_normal((ids.size, DIM), dtype=np.float32)
            stub.ApplyGradients(
                shard_pb2.ApplyGradientsRequest(
                    table=table.table, epoch=1, row_ids=ids.tobytes(), grads=grads.tobytes(), step=step, optimizer=opt
                ),
                timeout=60,
            )
            peak = max(peak, rss())
        out["rss_after_updates"] = rss()
        time.sleep(settle_s)  # the shard trims freed request memory every 2 s
        out["rss_settled"], out["rss_peak_traffic"] = rss(), peak
        for key in ("rss_ready", "rss_after_lookups", "rss_after_updates", "rss_settled", "rss_peak_traffic"):
            out["ratio_" + key.removeprefix("rss_")] = round(out[key] / held, 4)
        if lat:
            ms = sorted(x * 1e3 for x in lat)
            out["lookup"] = {
                "rows": lookup_rows,
                "dtype": "bf16",
                "calls": len(ms),
                "p50_ms": round(statistics.median(ms), 2),
                "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2),
                "rows_per_s": round(lookup_rows / statistics.median(ms) * 1e3),
            }
        channel.close()
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="fp32 weight size of the table")
    parser.add_argument("--optimizers", default="adam,adagrad")
    parser.add_argument("--lookups", type=int, default=30)
    parser.add_argument("--lookup-rows", type=int, default=65536)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--settle-s", type=float, default=3.0, help="idle time before the settled RSS reading")
    parser.add_argument("--machine", default="cpu-2core")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    results = [
        run_one(
            args.gib,
            opt,
            lookups=args.lookups,
            lookup_rows=args.lookup_rows,
            updates=args.updates,
            settle_s=args.settle_s,
        )
        for opt in args.optimizers.split(",")
    ]
    gib = 1 << 30
    print("ratio = RSS / (weights + optimizer state + mirror); target <= 1.15 (settled)")
    print(
        f"{'optimizer':<9} {'weights':>8} {'state':>8} {'mirror':>8} {'RSS ready':>10} {'ready':>6} {'+lookups':>9} "
        f"{'+updates':>9} {'peak':>6} {'settled':>8} {'boot s':>7} {'64K bf16 p50':>13}"
    )
    for r in results:
        print(
            f"{r['optimizer']:<9} {r['weight_bytes'] / gib:7.2f}G {r['state_bytes'] / gib:7.2f}G "
            f"{r['mirror_bytes'] / gib:7.2f}G "
            f"{r['rss_ready'] / gib:9.2f}G {r['ratio_ready']:6.3f} {r['ratio_after_lookups']:9.3f} "
            f"{r['ratio_after_updates']:9.3f} {r['ratio_peak_traffic']:6.3f} {r['ratio_settled']:8.3f} "
            f"{r['boot_s']:7.1f} {r.get('lookup', {}).get('p50_ms', 0):10.1f} ms"
        )
    if args.json:
        doc = {
            "benchmark": "shard_memory",
            "machine": args.machine,
            "cpus": psutil.cpu_count(),
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d"),
            "target_ratio": 1.15,
            "results": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
