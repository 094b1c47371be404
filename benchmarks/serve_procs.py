"""The processes of the serve benchmark (benchmarks/serve.py): a checkpoint, the shard cluster, `engram serve`.

checkpoint = make_checkpoint(tmp, "cpu")           # 2 training steps: the weights do not matter for speed
cluster = start_cluster(checkpoint, "cpu", tmp)   # 2 shard processes + `engram cluster load`
server = start_way("shm", checkpoint=checkpoint, sets=[...], tmp=tmp, cluster=cluster)
... http://{server.http}/v1/completions ...
stop(server.proc); cluster.stop()
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("local", "shm", "tcp", "grpc")
FALLBACK_MARK = "path unavailable"  # services/client/row_paths.py logs this once per fallen-back path


@dataclass(slots=True)
class Server:
    way: str
    proc: subprocess.Popen
    http: str  # host:port of the OpenAI-compatible API
    log: Path

    def fallbacks(self) -> int:
        """Row-path fallbacks the server logged so far (0 for a way that stayed on its path)."""
        return sum(FALLBACK_MARK in line for line in self.log.read_text(errors="replace").splitlines())


def serve_process(checkpoint: Path, sets: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`engram serve --checkpoint` with `--set`s, its stderr to `log` -> (process, host:port of its HTTP API)."""
    with log.open("w") as err:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engram_cli.main",
                "serve",
                "--checkpoint",
                str(checkpoint),
                "--port",
                "0",
                "--set",
                "worker.http_port=0",
                *[f"--set={s}" for s in sets],
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("READY "):
            return proc, dict(p.split("=", 1) for p in line.split()[1:])["http"]
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.wait(timeout=10)
    raise RuntimeError(f"engram serve did not print READY (log: {log.read_text()[-2000:]})")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def make_checkpoint(tmp: Path, preset: str) -> Path:
    """A checkpoint of `preset` after 2 training steps on a synthetic corpus."""
    from engram.config import load_config
    from trainer.local import train_local

    words = ["def", "return", "value", "self", "class", "import", "for", "in", "if", "else", "(", ")", ":"]
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(4000)))
    cfg = load_config(
        preset,
        None,
        [
            f'train.corpus=["{tmp / "corpus.txt"}"]',
            f"tokenizer.cache_dir={tmp / 'tok'}",
            f"train.out_dir={tmp / 'run'}",
            "train.progress=false",
            "train.steps=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.warmup_steps=1",
        ],
    )
    return Path(train_local(cfg).checkpoint)


def start_cluster(checkpoint: Path, preset: str, tmp: Path) -> Any:
    """2 shard processes holding the checkpoint's tables (`engram cluster load`) -> a started LocalCluster."""
    from services.launcher import LocalCluster

    cluster = LocalCluster(
        preset=preset, overrides=[], num_shards=2, log_dir=tmp / "logs-cluster", startup_timeout_s=120
    )
    cluster.start()
    load = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram_cli.main",
            "cluster",
            "load",
            str(checkpoint),
            "--preset",
            preset,
            *[f"--set={o}" for o in cluster.cluster_overrides],
            "--name",
            f"bench-serve-{tmp.name}",  # slot files under the cluster's checkpoint root
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if load.returncode:
        cluster.stop()
        raise RuntimeError(f"engram cluster load failed: {load.stderr}")
    return cluster


def start_way(way: str, *, checkpoint: Path, sets: list[str], tmp: Path, cluster: Any) -> Server:
    """`engram serve` for one way: local tables, or the cluster's rows over `cluster.row_path=way`."""
    if way not in WAYS:
        raise ValueError(f"way: unknown {way!r} (one of {', '.join(WAYS)})")
    sets = list(sets)
    if way != "local":
        sets += ["worker.row_source=remote", f"cluster.row_path={way}", *cluster.cluster_overrides]
    log = tmp / f"serve-{way}.log"
    proc, http = serve_process(checkpoint, sets, log)
    return Server(way=way, proc=proc, http=http, log=log)
