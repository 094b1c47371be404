"""`engram train --ray`: argument checks, and one end-to-end run with its own cluster (--up)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engram.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def engram(*args: str, timeout: float = 60.0, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram_cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_dist_config_is_validated_with_field_names() -> None:
    for override, field in [
        ("dist.mode=eventual", "dist.mode"),
        ("dist.staleness=-1", "dist.staleness"),
        ("dist.num_workers=-1", "dist.num_workers"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_config("tiny", None, [override])
    from trainer.ray_trainer import check_dist_config

    with pytest.raises(ConfigError, match="train.batch_size"):
        check_dist_config(load_config("tiny", None, ["dist.num_workers=3"]))


def test_ray_flags_need_ray() -> None:
    out = engram("train", "--preset", "tiny", "--mode", "async")
    assert out.returncode == 2 and "only with --ray" in out.stderr


def train_args(tmp_path, corpus, *extra: str) -> list[str]:
    return [
        "train",
        "--preset",
        "tiny",
        "--ray",
        "--up",
        "--workers",
        "2",
        "--set",
        f'train.corpus=["{corpus}"]',
        "--set",
        f"tokenizer.cache_dir={tmp_path / 'cache'}",
        "--set",
        f"train.out_dir={tmp_path / 'run'}",
        "--set",
        f"cluster.checkpoint_dir={tmp_path / 'shards'}",
        "--set",
        "cluster.wire_dtype=fp32",
        "--set",
        "train.checkpoint_every=5",
        "--set",
        "train.progress=false",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engram_train_ray_sigkilled_then_resumed(tmp_path) -> None:
    """SIGKILL the whole `engram train --ray --up` process group (driver, Ray, shards, Redis)
    after its step-10 checkpoint; `--resume` on a new cluster ends where an uninterrupted
    run ends (the local reference, which sync mode equals), and exports a servable model."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"def f_{i % 13}(x):\n    return x * {i % 7}\n" for i in range(300)))
    args = train_args(tmp_path, corpus)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engram_cli.main", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "checkpoint step 10" in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert any("checkpoint step 10" in line for line in seen), "".join(seen[-40:])
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # it really died before the end

    out = engram(*args, "--resume", timeout=280, env={"RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "validation loss" in out.stdout and "staleness max 0" in out.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["resumed_from"] in (10, 15)

    from engram.checkpoint import load_model
    from engram.data import prepare_data
    from trainer.local import train_local

    cfg = load_config(
        "tiny",
        None,
        [a for a in args[args.index("--set") :] if a != "--set"]
        + [f"train.out_dir={tmp_path / 'local'}", "train.grad_accum=2"],
    )  # the 2 workers' split
    local = train_local(cfg, data=prepare_data(cfg))
    assert len(result["train_losses"]) == 20
    assert result["train_losses"] == pytest.approx(local.train_losses, rel=1e-6)
    assert result["final_val_loss"] == pytest.approx(local.final_val_loss, rel=1e-6)
    model, loaded, _ = load_model(tmp_path / "run" / "checkpoint.pt")  # what `engram serve` loads
    assert loaded.dist.mode == "sync" and len(model.tables) == 1
    assert (tmp_path / "run" / "loss.png").is_file()
