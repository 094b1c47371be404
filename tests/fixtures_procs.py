"""Process fixtures for the client, launcher and rebalance tests: real Redis + real shards.

`cluster_fixture(...)` builds a module-scoped pytest fixture around `LocalCluster`; helpers
compute the rows a fresh cluster must return (engram.init.init_rows) and run coroutines.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from engram.config import Config
from engram.init import init_rows
from services.launcher import LocalCluster
from tests import fixtures_tls

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def secure_cluster(overrides: list[str], *, num_shards: int, log_dir: Any, **kw: Any) -> LocalCluster:
    """A tiny-preset LocalCluster as `engram up` starts one (Redis with a password, a signed control
    plane, mTLS and roles on every shard with the session's certificates), not started yet;
    `kw`: LocalCluster's other arguments (replicas, shard_args, startup_timeout_s: 60 here)."""
    kw.setdefault("preset", "tiny")
    kw.setdefault("startup_timeout_s", 60)
    return LocalCluster(
        overrides=overrides, num_shards=num_shards, log_dir=log_dir, secure=True, certs=fixtures_tls.bundle(), **kw
    )


def cluster_fixture(
    *, num_shards: int, overrides: list[str], preset: str = "tiny", secure: bool = True, tls: bool = True
) -> Any:
    """A module-scoped fixture yielding a started LocalCluster; stopped (no leftovers) at teardown.

    By default as `engram up` starts one: `secure` (Redis with a password, a signed control plane)
    and `tls` (mTLS and roles on every shard, the session's certificates: tests/fixtures_tls.py).
    Clients take `cluster.security(role)` / `cluster.client_overrides(role)`. Only tests about
    plaintext behaviour pass `tls=False`."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
        root = tmp_path_factory.mktemp("cluster-checkpoints")  # the shards' checkpoint root
        cluster = LocalCluster(
            preset=preset,
            overrides=[f"cluster.checkpoint_dir={root}", *overrides],
            num_shards=num_shards,
            log_dir=tmp_path_factory.mktemp("cluster-logs"),
            startup_timeout_s=60,
            secure=secure,
            certs=fixtures_tls.bundle() if tls else None,
        )
        with cluster:
            yield cluster
        for pid in cluster.pids():
            assert not pid_alive(pid), f"process {pid} outlived LocalCluster.stop()"

    return fixture


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def expected_rows(cfg: Config, table: int, ids: np.ndarray, *, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows a fresh cluster serves for ids (any shape) -> (*ids.shape, D) in `dtype`."""
    dim = cfg.engram.n_embed_per_ngram // cfg.engram.n_head_per_ngram
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    rows = init_rows(seed=cfg.engram.seed, layer_id=table, rows=flat, dim=dim, std=cfg.engram.init_std)
    return torch.from_numpy(rows).to(dtype).view(*np.shape(ids), dim)


def pid_alive(pid: int) -> bool:
    """True if `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def engram_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram_cli.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
