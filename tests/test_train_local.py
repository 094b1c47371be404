"""Local training end to end on a tiny corpus the test writes itself."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from engram.checkpoint import load_model
from engram.config import load_config
from engram.data import prepare_data
from tests.corpus import write_code_corpus
from trainer.local import train_local


@pytest.fixture()
def corpus(tmp_path):
    return write_code_corpus(tmp_path / "corpus.txt")


def cfg_for(tmp_path, corpus, *extra: str):
    return load_config(
        "tiny",
        None,
        [
            f'train.corpus=["{corpus}"]',
            f"tokenizer.cache_dir={tmp_path / 'cache'}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.progress=false",
            "train.steps=16",
            "train.eval_every=8",
            "train.warmup_steps=2",
            *extra,
        ],
    )


def test_trains_checkpoints_and_plots(tmp_path, corpus) -> None:
    cfg = cfg_for(tmp_path, corpus)
    result = train_local(cfg)
    assert len(result.train_losses) == 16
    assert np.mean(result.train_losses[-4:]) < np.mean(result.train_losses[:4])
    assert [s for s, _ in result.val_losses] == [8, 16]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    model, loaded_cfg, tok_json = load_model(result.checkpoint)
    assert loaded_cfg == cfg and "model" in tok_json


def test_resume_reaches_the_same_loss(tmp_path, corpus) -> None:
    """Stop after 8 steps, resume to 16: identical to 16 uninterrupted steps."""
    full = train_local(cfg_for(tmp_path / "a", corpus))
    cfg_b = cfg_for(tmp_path / "b", corpus, "train.checkpoint_every=8")
    data = prepare_data(cfg_b)
    train_local(cfg_b, data=data, stop_at=8)  # "killed" after the step-8 checkpoint
    resumed = train_local(cfg_b, data=data, resume=True)
    assert resumed.train_losses == pytest.approx(full.train_losses, rel=1e-5)
    assert resumed.final_val_loss == pytest.approx(full.final_val_loss, rel=1e-5)


def test_cli_bad_configuration_exits_2(tmp_path) -> None:
    for args, field in [
        (["--set", "engram.layer_ids=[0]"], "engram.layer_ids"),
        (["--set", f'train.corpus=["{tmp_path}/missing"]'], "train.corpus"),
        (["--set", "model.d_model=-4"], "model.d_model"),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "engram_cli.main", "train", "--preset", "tiny", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert field in proc.stderr
