"""The lookup benchmark's report: the table it prints, TLS cost beside plain, and the issue's targets."""

from __future__ import annotations

from typing import Any


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"\n{'method':<18} {'dtype':<5} {'batch':>7} {'Mrows/s':>9} {'GB/s':>7} {'p50 ms':>9} {'p99 ms':>9} "
        f"{'reps':>5} {'client cpu ms':>13} {'shard cpu ms':>12}"
    )
    for r in results:
        name = f"{r['method']} {r['shards']} shard{'s' if r['shards'] > 1 else ''}" if "shards" in r else r["method"]
        client_cpu = f"{r['client_cpu_ms']:.2f}" if "client_cpu_ms" in r else ""
        shard_cpu = f"{r['shards_cpu_ms']:.2f}" if "shards_cpu_ms" in r else ""
        print(
            f"{name:<18} {r['dtype']:<5} {r['batch']:>7} {r['rows_per_s'] / 1e6:>9.2f} {r['gb_per_s']:>7.2f} "
            f"{r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['reps']:>5} {client_cpu:>13} {shard_cpu:>12}"
        )


def tls_cost(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each `<path>+tls` row beside its plain row: throughput and p50 ratios (same run, same ids)."""
    plain = {(r["method"], r.get("shards"), r["dtype"], r["batch"]): r for r in results}
    out = []
    for r in results:
        if not r["method"].endswith("+tls"):
            continue
        base = plain.get((r["method"][: -len("+tls")], r.get("shards"), r["dtype"], r["batch"]))
        if base is None:
            continue
        out.append(
            {
                "path": base["method"],
                "shards": r["shards"],
                "dtype": r["dtype"],
                "batch": r["batch"],
                "plain_p50_ms": base["p50_ms"],
                "tls_p50_ms": r["p50_ms"],
                "p50_ratio": r["p50_ms"] / base["p50_ms"],
                "throughput_ratio": r["rows_per_s"] / base["rows_per_s"],
            }
        )
    return out


TARGETS = {"shm": {"of_numpy": 0.9, "p50_1k_ms": 0.1}, "tcp": {"of_numpy": 0.75, "p50_1k_ms": 0.4}, "grpc": {}}
MGET_TARGET = 25.0


def targets(results: list[dict[str, Any]], batch: int = 65536, small: int = 1024) -> dict[str, Any]:
    """The issue's figures: 64K bf16 rows from one shard vs numpy and Redis; 1K-row p50s."""

    def row(method: str, size: int, **kw: Any) -> dict[str, Any] | None:
        for r in results:
            if (
                r["method"] == method
                and r["dtype"] == "bf16"
                and r["batch"] == size
                and all(r.get(k) == v for k, v in kw.items())
            ):
                return r
        return None

    local, mget = row("numpy", batch), row("redis_mget", batch)
    out: dict[str, Any] = {"batch": batch, "dtype": "bf16", "shards": 1}
    for path, want in TARGETS.items():
        r, r1k = row(path, batch, shards=1), row(path, small, shards=1)
        t: dict[str, Any] = {}
        if r and local:
            t["of_numpy"] = r["rows_per_s"] / local["rows_per_s"]
        if r and mget:
            t["over_redis_mget"] = r["rows_per_s"] / mget["rows_per_s"]
        if r1k:
            t["p50_1k_ms"] = r1k["p50_ms"]
        if t:
            out[path] = (
                t
                | {f"{k}_target": v for k, v in want.items()}
                | ({"over_redis_mget_target": MGET_TARGET} if want else {})
            )
    return out
