"""Keeping the shard's resident size close to its tables (glibc malloc tuning, best effort).

Table tensors are allocated once; what grows RSS beyond them is transient request memory
(reply buffers, gradient temporaries) that glibc keeps in per-thread arenas after it is
freed. Two measures: at most `arenas` malloc arenas (the worker threads share them), and a
`malloc_trim(0)` after heavy work, at most every `period_s`, which hands the freed pages
back. A fixed mmap threshold would return them at once but costs a page-fault storm on every
large reply (measured 8x slower 64K-row lookups), so it is not used.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
from concurrent.futures import Executor

_M_ARENA_MAX = -8
_libc = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def limit_arenas(arenas: int = 2) -> None:
    """Call before worker threads start allocating."""
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(_M_ARENA_MAX, arenas)


def trim() -> None:
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


class Trimmer:
    """Counts bytes of heavy requests; `run()` trims when enough went through."""

    def __init__(self, *, threshold_bytes: int = 32 << 20, period_s: float = 2.0) -> None:
        self.threshold_bytes = threshold_bytes
        self.period_s = period_s
        self.pending_bytes = 0

    def note(self, nbytes: int) -> None:
        self.pending_bytes += nbytes

    async def run(self, pool: Executor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period_s)
            if self.pending_bytes >= self.threshold_bytes:
                self.pending_bytes = 0
                await loop.run_in_executor(pool, trim)
