"""Every benchmark runs at its smallest size, so a benchmark cannot rot unnoticed.

Each case is the real `python -m benchmarks.NAME` process with tiny arguments and a JSON report
written to a temporary folder; the numbers mean nothing here (they are timings on a shared CI
machine), only that the benchmark runs to the end and writes its report. The list is checked
against `engram bench --list`'s discovery, so a new benchmark without a smoke case fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram_cli.cmd_bench import discover

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp: Path) -> list[str]:
    """Overrides that keep the data small and every cache inside the test's folder."""
    return [
        "--set",
        "train.max_corpus_mb=0.05",
        "--set",
        f"tokenizer.cache_dir={tmp / 'cache'}",
        "--set",
        "train.progress=false",
    ]


CASES: dict[str, object] = {
    "failover": lambda tmp: ["--preset", "tiny", "--rows", "64", "--skip-training", "--wait-s", "60"],
    "lookup_fp8": lambda tmp: ["--rows", "1024", "--reps", "1"],
    "soak": lambda tmp: ["--minutes", "0.15", "--every-s", "4"],
    "lookup": lambda tmp: [
        "--shards",
        "1",
        "--batches",
        "256",
        "--dtypes",
        "fp32",
        "--paths",
        "grpc,tcp",
        "--target-rows",
        "256",
        "--min-reps",
        "1",
        "--max-reps",
        "1",
        "--no-baselines",
    ],
    "lookup_runs": lambda tmp: [
        "--runs",
        "2",
        "--",
        *["--shards", "1", "--batches", "256", "--dtypes", "fp32", "--paths", "tcp", "--target-rows", "256"],
        *["--min-reps", "1", "--max-reps", "1", "--no-baselines"],
    ],
    "ngram_stats": lambda tmp: ["--preset", "tiny", *_tiny(tmp)],
    "prefetch": lambda tmp: ["--preset", "tiny", "--shards", "1", "--batches", "1", "--repeats", "1", *_tiny(tmp)],
    "quality": lambda tmp: [
        "--preset",
        "tiny",
        "--seeds",
        "1",
        "--set",
        "train.steps=4",
        "--set",
        "train.eval_every=4",
        "--out",
        str(tmp / "quality"),
        *_tiny(tmp),
    ],
    "serve": lambda tmp: [
        "--preset",
        "tiny",
        "--quick",
        "--ways",
        "local",
        "shm",  # a remote way too: the cluster start and `engram cluster load` must keep working
        "--concurrency",
        "1",
        "--requests",
        "2",
        "--reps",
        "1",
    ],
    "shard_memory": lambda tmp: [
        "--gib",
        "0.02",
        "--optimizers",
        "adam",
        "--lookups",
        "1",
        "--lookup-rows",
        "64",
        "--updates",
        "1",
        "--settle-s",
        "0",
    ],
    "sync_equivalence": lambda tmp: [
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--workers",
        "1",
        "--shards",
        "1",
        "--out-dir",
        str(tmp / "sync"),
        *_tiny(tmp),
    ],
    "table_scaling": lambda tmp: [
        "--preset",
        "tiny",
        "--sizes",
        "251",
        "--set",
        "train.steps=4",
        "--set",
        "train.eval_every=4",
        "--out",
        str(tmp / "scaling"),
        *_tiny(tmp),
    ],
    "train_throughput": lambda tmp: [
        "--steps",
        "2",
        "--rounds",
        "1",
        "--workers",
        "1",
        "--shards",
        "1",
        "--modes",
        "sync",
        "--out-dir",
        str(tmp / "throughput"),
        *_tiny(tmp),
    ],
}


def test_every_benchmark_has_a_smoke_case() -> None:
    assert set(CASES) == set(discover(ROOT / "benchmarks"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_at_its_smallest_size(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    args = CASES[name](tmp_path)  # type: ignore[operator]
    r = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert isinstance(report, dict) and report, name
    if name == "lookup_runs":  # two whole runs and a summary of both
        assert len(report["per_run"]) == 2 and report["summary"]["tcp fp32 256 1 shard(s)"]["runs"] == 2
