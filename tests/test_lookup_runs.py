"""benchmarks/lookup_runs.py: medians and ranges across runs of the lookup benchmark (pure)."""

from __future__ import annotations

import pytest

from benchmarks.lookup_runs import main, summarize_runs


def run(p50_tcp: float, of_numpy: float, mget: float) -> dict:
    return {
        "results": [
            {"method": "numpy", "dtype": "bf16", "batch": 65536, "p50_ms": 4.0},
            {"method": "tcp", "shards": 1, "dtype": "bf16", "batch": 65536, "p50_ms": p50_tcp},
        ],
        "targets": {
            "tcp": {
                "of_numpy": of_numpy,
                "over_redis_mget": mget,
                "of_numpy_target": 0.75,
                "over_redis_mget_target": 25.0,
            }
        },
    }


def test_medians_ranges_and_targets_across_runs() -> None:
    s = summarize_runs([run(5.0, 0.8, 20.0), run(4.0, 1.0, 27.0), run(4.5, 0.9, 26.0)])
    tcp = s["tcp bf16 65536 1 shard(s)"]
    assert tcp["p50_ms_median"] == 4.5 and tcp["p50_ms_range"] == [4.0, 5.0] and tcp["runs"] == 3
    assert s["numpy bf16 65536"]["p50_ms_per_run"] == [4.0, 4.0, 4.0]
    assert s["tcp of_numpy"] == {"median": 0.9, "range": [0.8, 1.0], "per_run": [0.8, 1.0, 0.9], "target": 0.75}
    assert s["tcp over_redis_mget"]["median"] == 26.0 and s["tcp over_redis_mget"]["target"] == 25.0
    assert "tcp p50_1k_ms" not in s  # no 1K batch in these runs: no figure, not a made-up one
    assert "shm of_numpy" not in s


def test_bad_arguments_are_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--runs", "0"])
    assert "--runs 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--json"])
    assert "--json" in capsys.readouterr().err
