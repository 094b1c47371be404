"""Session-wide test hygiene: shard table files in /dev/shm left by shards the tests killed
(SIGKILL gives a shard no chance to unlink them) are removed when the session ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import engram  # noqa: F401 - first, before any matmul: MKL's reproducible mode (engram/__init__.py)
from services.shard.shm_table import sweep_dead_tables


@pytest.fixture(scope="session", autouse=True)
def _sweep_killed_shards_tables() -> Iterator[None]:
    yield
    shm = Path("/dev/shm")
    if shm.is_dir():
        sweep_dead_tables(shm, "engram.", headerless=False)  # only table files whose writer is gone
