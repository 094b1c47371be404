"""benchmarks.quality: seeds, variants (frozen table, same-parameter dense), statistics, JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.quality import main as quality_main
from benchmarks.quality import param_counts, same_params_hidden, variant_config
from benchmarks.seed_stats import summarize, t975
from engram.checkpoint import load_model
from engram.config import ConfigError, load_config
from engram.data import prepare_data
from tests.corpus import write_code_corpus
from trainer.local import train_local


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    write_code_corpus(root / "corpus.txt")
    ov = [f'train.corpus=["{root / "corpus.txt"}"]', f"tokenizer.cache_dir={root / 'cache'}", "train.progress=false"]
    cfg = load_config("tiny", None, ov)
    return root, ov, cfg, prepare_data(cfg)


def test_summary_statistics() -> None:
    s = summarize([0.01, 0.02, 0.03])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.02) and s["std"] == pytest.approx(0.01)
    half = 4.303 * 0.01 / math.sqrt(3)
    assert s["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    assert (s["min"], s["max"]) == (0.01, 0.03)
    assert summarize([0.5])["ci95"] is None
    assert t975(1) == 12.706 and t975(100) == 1.96
    with pytest.raises(ValueError, match="empty"):
        summarize([])


def test_config_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match="model.ffn.*not implemented"):
        load_config("tiny", None, ["model.ffn=moe"])
    with pytest.raises(ConfigError, match="model.ffn"):
        load_config("tiny", None, ["model.ffn=sparse"])
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config("tiny", None, ["train.grad_accum=3"])  # batch 4 does not split in 3
    with pytest.raises(ConfigError, match="train.grad_accum"):
        load_config("tiny", None, ["train.grad_accum=0"])
    from trainer.ray_trainer import check_dist_config

    with pytest.raises(ConfigError, match="engram.freeze_table"):
        check_dist_config(load_config("tiny", None, ["engram.freeze_table=true"]))
    with pytest.raises(ConfigError, match="train.grad_accum"):
        check_dist_config(load_config("tiny", None, ["train.grad_accum=2"]))


def test_frozen_table_rows_never_move_but_the_rest_trains(setup) -> None:
    root, ov, _, data = setup
    cfg = load_config(
        "tiny", None, [*ov, "engram.freeze_table=true", "train.steps=4", f"train.out_dir={root / 'frozen'}"]
    )
    init = load_config("tiny", None, [*ov, "train.steps=1"])
    from engram.model import EngramLM

    torch.manual_seed(cfg.train.seed)
    start = EngramLM(cfg, data[1].lookup).state_dict()
    result = train_local(cfg, data=data)
    trained, _, _ = load_model(result.checkpoint)
    state = trained.state_dict()
    tables = [k for k in state if k.startswith("tables.")]
    assert tables and all(torch.equal(state[k], start[k]) for k in tables)
    engram_proj = [k for k in state if ".engram.value_proj." in k or ".engram.key_projs." in k]
    assert engram_proj and all(not torch.equal(state[k], start[k]) for k in engram_proj)
    assert init.engram.freeze_table is False


def test_same_params_dense_matches_the_engram_model(setup) -> None:
    _, _, cfg, data = setup
    lookup = data[1].lookup
    engram_params = param_counts(cfg, lookup)["total"]
    dense = variant_config(cfg, "dense-same-params", 7, compress_lookup=lookup)
    assert not dense.engram.enabled and dense.model.mlp_hidden == same_params_hidden(cfg, lookup)
    dense_params = param_counts(dense, lookup)
    per_hidden_unit = 3 * cfg.model.d_model * cfg.model.n_layer
    assert abs(dense_params["total"] - engram_params) <= per_hidden_unit / 2 and dense_params["tables"] == 0
    assert dense.train.seed == dense.engram.seed == 7


def test_multi_seed_report_with_every_variant(setup) -> None:
    root, ov, _, _ = setup
    out = root / "report.json"
    sets = [a for o in [*ov, "train.steps=4", "train.eval_every=4"] for a in ("--set", o)]
    args = [
        "--preset",
        "tiny",
        "--seeds",
        "2",
        "--variants",
        "baseline,engram,engram-frozen,dense-same-params",
        "--out",
        str(root / "runs"),
        "--json",
        str(out),
        *sets,
    ]
    assert quality_main(args) == 0
    report = json.loads(out.read_text())
    seeds = report["seeds"]
    assert seeds == [1234, 1235]
    assert set(report["runs"]) == {"baseline", "engram", "engram-frozen", "dense-same-params"}
    for name in ("engram", "engram-frozen", "dense-same-params"):
        s = report["summary"][name]
        gains = [
            (report["runs"]["baseline"][str(k)]["final_val_loss"] - report["runs"][name][str(k)]["final_val_loss"])
            / report["runs"]["baseline"][str(k)]["final_val_loss"]
            for k in seeds
        ]
        assert s["stats"]["n"] == 2 and s["stats"]["mean"] == pytest.approx(sum(gains) / 2)
        assert s["stats"]["ci95"][0] <= s["stats"]["mean"] <= s["stats"]["ci95"][1]
    # paired runs see the same tokens; the same-parameter model costs more FLOPs per step
    base = report["runs"]["baseline"]["1234"]
    assert all(r["tokens"] == base["tokens"] for runs in report["runs"].values() for r in runs.values())
    assert report["summary"]["dense-same-params"]["step_flops_ratio"] > report["summary"]["engram"]["step_flops_ratio"]
    # different seeds are different runs
    assert report["runs"]["engram"]["1234"]["final_val_loss"] != report["runs"]["engram"]["1235"]["final_val_loss"]
    assert (root / "runs" / "gate_heatmap.png").is_file()
    # one seed run alone (another process) reproduces that seed bit for bit, and merges back
    part = root / "part.json"
    assert (
        quality_main(
            [
                "--preset",
                "tiny",
                "--seed-list",
                "1235",
                "--variants",
                "baseline,engram",
                "--out",
                str(root / "part"),
                "--json",
                str(part),
                *sets,
            ]
        )
        == 0
    )
    first = root / "first.json"
    assert (
        quality_main(
            [
                "--preset",
                "tiny",
                "--seed-list",
                "1234",
                "--variants",
                "baseline,engram",
                "--out",
                str(root / "first"),
                "--json",
                str(first),
                *sets,
            ]
        )
        == 0
    )
    merged_path = root / "merged.json"
    assert quality_main(["--merge", str(first), str(part), "--json", str(merged_path)]) == 0
    merged = json.loads(merged_path.read_text())
    assert merged["seeds"] == [1234, 1235]
    for name in ("baseline", "engram"):
        for k in ("1234", "1235"):
            assert merged["runs"][name][k]["final_val_loss"] == report["runs"][name][k]["final_val_loss"]
    assert merged["summary"]["engram"]["stats"] == report["summary"]["engram"]["stats"]
    other = root / "other.json"
    assert (
        quality_main(
            [
                "--preset",
                "tiny",
                "--seed-list",
                "1",
                "--variants",
                "baseline",
                "--out",
                str(root / "o"),
                "--json",
                str(other),
                *sets,
                "--set",
                "model.d_model=64",
            ]
        )
        == 0
    )
    with pytest.raises(ValueError, match="another configuration"):
        quality_main(["--merge", str(first), str(other)])


def test_bad_arguments_are_refused(setup) -> None:
    with pytest.raises(SystemExit):
        quality_main(["--seeds", "0"])
    with pytest.raises(SystemExit):
        quality_main(["--variants", "engram,moe"])
