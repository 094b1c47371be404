from __future__ import annotations

import json

import pytest

from engram.config import ConfigError, config_from_dict, load_config


def test_presets_validate() -> None:
    for preset in ("tiny", "cpu", "small", "paper27b"):
        cfg = load_config(preset)
        assert cfg.model.d_model > 0


def test_overrides_and_file(tmp_path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"steps": 7}, "engram": {"layer_ids": [1]}}))
    cfg = load_config("tiny", str(f), ["train.lr=0.01", "engram.enabled=false", "train.out_dir=/tmp/x"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and not cfg.engram.enabled and cfg.train.out_dir == "/tmp/x"
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nn_layer = 3\n")
    assert load_config("tiny", str(toml)).model.n_layer == 3
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override,field",
    [
        ("engram.layer_ids=[0]", "engram.layer_ids"),
        ("engram.layer_ids=[5]", "engram.layer_ids"),
        ("model.d_model=0", "model.d_model"),
        ("model.n_layer=-1", "model.n_layer"),
        ("engram.table_size_per_ngram=[0, 5]", "engram.table_size_per_ngram"),
        ("engram.table_size_per_ngram=[11]", "engram.table_size_per_ngram"),
        ("engram.n_head_per_ngram=0", "engram.n_head_per_ngram"),
        ("engram.n_embed_per_ngram=15", "engram.n_embed_per_ngram"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.seq_len=100000", "train.seq_len"),
        ("tokenizer.vocab_size=100000", "tokenizer.vocab_size"),
        ("cluster.wire_dtype=int8", "cluster.wire_dtype"),
        ("cluster.row_path=udp", "cluster.row_path"),
        ("cluster.data_port=70000", "cluster.data_port"),
        ("cluster.row_mirror=fp8", "cluster.row_mirror"),
        ("cluster.host_id=a b", "cluster.host_id"),
        ("cluster.shm_dir=", "cluster.shm_dir"),
        ("cluster.num_slots=1", "cluster.num_shards"),
        ("train.steps=abc", "train.steps"),
        ("train.nope=1", "train.nope"),
        ("nosection.x=1", "nosection.x"),
    ],
)
def test_bad_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny", None, [override])


def test_missing_file_and_preset() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", "/nonexistent.toml")
    with pytest.raises(ConfigError, match="preset"):
        load_config("huge")


def test_layer_zero_message_says_why() -> None:
    with pytest.raises(ConfigError, match="layer 0"):
        load_config("tiny", None, ["engram.layer_ids=[0]"])
