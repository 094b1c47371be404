"""`engram train --ray`: argument checks, and one end-to-end run with its own cluster (--up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engram.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def engram(*args: str, timeout: float = 60.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engram_cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_dist_config_is_validated_with_field_names() -> None:
    for override, field in [("dist.mode=eventual", "dist.mode"), ("dist.staleness=-1", "dist.staleness"),
                            ("dist.num_workers=0", "dist.num_workers")]:
        with pytest.raises(ConfigError, match=field):
            load_config("tiny", None, [override])
    from trainer.ray_trainer import check_dist_config

    with pytest.raises(ConfigError, match="train.batch_size"):
        check_dist_config(load_config("tiny", None, ["dist.num_workers=3"]))


def test_ray_flags_need_ray() -> None:
    out = engram("train", "--preset", "tiny", "--mode", "async")
    assert out.returncode == 2 and "only with --ray" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engram_train_ray_up_end_to_end(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"def f_{i % 13}(x):\n    return x * {i % 7}\n" for i in range(300)))
    out = engram(
        "train", "--preset", "tiny", "--ray", "--up", "--workers", "2",
        "--set", f"train.corpus=[\"{corpus}\"]", "--set", f"tokenizer.cache_dir={tmp_path / 'cache'}",
        "--set", f"train.out_dir={tmp_path / 'run'}", "--set", f"cluster.checkpoint_dir={tmp_path / 'shards'}",
        "--set", "train.steps=6", "--set", "train.eval_every=3", "--set", "train.progress=false",
        timeout=280, env={"RAY_ADDRESS": ""},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "validation loss" in out.stdout and "staleness max 0" in out.stdout
    from trainer.checkpoint import load_model

    model, cfg, _ = load_model(tmp_path / "run" / "checkpoint.pt")  # what `engram serve` loads
    assert cfg.dist.mode == "sync" and len(model.tables) == 1
    assert (tmp_path / "run" / "loss.png").is_file()
