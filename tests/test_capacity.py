"""The capacity planner's arithmetic against hand-computed cases, V4.1-Flash's real sizes included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engram.capacity import PlanInput, generalized_harmonic, parse_bytes, plan, zipf_hit_rate
from engram.config import EngramConfig, load_config
from engram_cli.main import main
from tests.test_tokenizer_hf import TOKENS, write_hf_tokenizer

GIB = 2**30


def test_v41flash_bytes_per_shard_by_hand() -> None:
    p = plan(
        PlanInput(
            engram=load_config("v41flash").engram,
            row_format="fp8",
            num_shards=2,
            replicas=2,
            node_ram_bytes=512 * GIB,
            gpu_tokens_per_s=20_000,
        )
    )
    # 384,006,168 = 256 * 1,500,024 + 24 and 384,016,682 = 256 * 1,500,065 + 42: shard 0 holds slots
    # 0..127, i.e. 128 full rounds plus the 24 (resp. 42) slots that hold one row more
    shard0_rows = (128 * 1_500_024 + 24) + (128 * 1_500_065 + 42)
    assert p["shard"]["rows_max"] == shard0_rows == 384_011_458
    assert p["shard"]["bytes_max"] == shard0_rows * 264 == 101_379_024_912
    assert p["shard"]["bytes_min"] == (768_022_850 - shard0_rows) * 264
    assert p["layout"]["total_bytes"] == 768_022_850 * 264
    assert p["shard"]["fits"] and p["shard"]["usable_ram_bytes"] == int(512 * GIB * 0.9)
    assert p["worker"]["rows_per_token"] == 48  # 2 layers x 3 orders x 8 heads
    one = plan(
        PlanInput(
            engram=load_config("v41flash").engram,
            row_format="fp8",
            num_shards=1,
            replicas=1,
            node_ram_bytes=128 * GIB,
            gpu_tokens_per_s=1,
        )
    )
    assert not one["shard"]["fits"]  # 189 GiB on one 128 GiB node


def _toy(**kw: object) -> dict:
    # one layer, one order, one head: the prime after 10 is 11 rows of 32 dims
    e = EngramConfig(
        layer_ids=[1], max_ngram_size=2, n_head_per_ngram=1, n_embed_per_ngram=32, table_size_per_ngram=[10]
    )
    base: dict = dict(
        engram=e,
        row_format="fp8",
        num_shards=2,
        replicas=2,
        node_ram_bytes=1000,
        ram_reserve=0.0,
        gpu_tokens_per_s=1000.0,
        workers=2,
        num_slots=4,
    )
    base.update(kw)
    return plan(PlanInput(**base))


def test_toy_plan_by_hand() -> None:
    p = _toy()
    # 11 rows over 4 slots: slots 0,1,2 hold 3 rows, slot 3 holds 2; shard 0 = slots 0-1, shard 1 = slots 2-3
    assert p["layout"]["total_rows"] == 11 and p["layout"]["tables"][0]["row_bytes"] == 33  # 32 + 1 scale
    assert (p["shard"]["rows_max"], p["shard"]["bytes_max"], p["shard"]["bytes_min"]) == (6, 198, 165)
    # 2 workers x 1000 tokens/s x 1 row/token; the busiest shard has 6/11 of the rows, split over 2 replicas
    assert p["shard"]["rows_per_s"] == pytest.approx(2000 * 6 / 11 / 2)
    assert p["shard"]["bytes_per_s"] == pytest.approx(2000 * 6 / 11 / 2 * 33)
    assert p["worker"]["rows_per_s"] == 1000 and p["worker"]["rx_bytes_per_s"] == 33_000
    assert p["worker"]["tx_bytes_per_s"] == 8000 and p["worker"]["cache_hit_rate"] == 0.0
    assert p["shard"]["fits"] and not _toy(node_ram_bytes=197)["shard"]["fits"]
    # bf16 storage with adam: 64 B row + 2 * 4 * 32 B moments = 320 B per row
    assert _toy(row_format="bf16", optimizer="adam")["shard"]["bytes_max"] == 6 * 320
    # a cache of 2 bf16 rows (2 * 32 * 2 B) with s = 1: (1 + 1/2) / H(11, 1)
    q = _toy(cache_bytes_per_worker=128, zipf={2: 1.0})
    h11 = sum(1 / k for k in range(1, 12))
    assert q["worker"]["cache_hit_rate"] == pytest.approx(1.5 / h11)
    assert q["worker"]["rows_per_s"] == pytest.approx(1000 * (1 - 1.5 / h11))


def test_harmonic_and_hit_rate() -> None:
    for n, s in [(10, 0.8), (20_000, 0.7), (1_000_000, 1.0), (3_000_000, 0.62), (2_000_000, 1.3)]:
        direct = float(np.sum(np.arange(1, n + 1, dtype=np.float64) ** -s))
        assert generalized_harmonic(n, s) == pytest.approx(direct, rel=1e-12)
    assert zipf_hit_rate(2, 4, 1.0) == pytest.approx(1.5 / (1 + 1 / 2 + 1 / 3 + 1 / 4))
    assert zipf_hit_rate(0, 10, 1.0) == 0.0 and zipf_hit_rate(10, 10, 0.5) == 1.0
    assert zipf_hit_rate(100, 10_000, 0.0) == pytest.approx(0.01)  # s = 0: uniform


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="fp8 are read-only"):
        _toy(optimizer="adam")
    with pytest.raises(ValueError, match="wire format bf16 .* wider than the table's storage format fp8"):
        _toy(wire_format="bf16")
    with pytest.raises(ValueError, match="num_shards: must be an integer >= 1"):
        _toy(num_shards=0)
    with pytest.raises(ValueError, match="5 shards need at least as many slots \\(4\\)"):
        _toy(num_shards=5)
    assert parse_bytes("512GiB") == 512 * GIB and parse_bytes("64GB") == 64 * 10**9 and parse_bytes("4096") == 4096
    assert parse_bytes("1.5TiB") == int(1.5 * 2**40) and parse_bytes("8 gib") == 8 * GIB
    for bad in ("lots", "GiB", "-1GiB", "12XB"):
        with pytest.raises(ValueError, match="size"):
            parse_bytes(bad)


def test_cli_json_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = [
        "plan",
        "--layout",
        "v41flash",
        "--format",
        "fp8",
        "--shards",
        "2",
        "--replicas",
        "2",
        "--node-ram",
        "512GiB",
        "--gpu-tokens-per-s",
        "20000",
    ]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shard"]["bytes_max"] == 101_379_024_912 and out["layout_preset"] == "v41flash"
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "101,379,024,912 B" in text and "fits" in text
    with pytest.raises(SystemExit):
        main(["plan", "--shards", "2", "--node-ram", "1GiB", "--gpu-tokens-per-s", "fast"])
    assert main(["plan", "--shards", "2", "--node-ram", "lots", "--gpu-tokens-per-s", "1"]) == 2
    assert "cannot parse 'lots'" in capsys.readouterr().err
    assert main(["plan", "--shards", "1", "--node-ram", "64GiB", "--gpu-tokens-per-s", "1"]) == 1  # does not fit
    # a tokenizer whose |V'| is not the layout's 99,092 is refused with both numbers
    folder = write_hf_tokenizer(tmp_path / "hf", clean_up=False)
    assert main([*args, "--tokenizer", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "built for |V'| = 99,092" in err and f"compresses {len(TOKENS)} tokens" in err
