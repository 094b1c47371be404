"""Keeping the shard's resident size close to its tables.

Table tensors are allocated once (`alloc_table`: huge-page advice; state committed up front
so a shard never OOMs later on its own tables). What grows RSS beyond them is transient
request memory (reply buffers, gradient temporaries) that glibc keeps in per-thread arenas
after it is freed. Two measures: at most `arenas` malloc arenas (the worker threads share
them), and a `malloc_trim(0)` after heavy work, at most every `period_s`, which hands the
freed pages back. A fixed mmap threshold would return them at once but costs a page-fault storm on every
large reply (measured 8x slower 64K-row lookups), so it is not used.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
from concurrent.futures import Executor

import torch

from services.shm_map import HUGE_PAGE, MADV_HUGEPAGE

_M_ARENA_MAX = -8
_libc = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def alloc_table(shape: tuple[int, ...]) -> torch.Tensor:
    """An fp32 tensor for table data, backed by transparent huge pages where the kernel allows.

    Random row gathers over GiBs miss the TLB on 4 KiB pages; 2 MiB pages cut the page walks.
    Advised before the first touch, so the pages are huge when they fault in.
    """
    t = torch.empty(shape, dtype=torch.float32)
    if t.nbytes >= 4 * HUGE_PAGE and _libc is not None:
        start = (t.data_ptr() + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        end = (t.data_ptr() + t.nbytes) & ~(HUGE_PAGE - 1)
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)  # best effort
    return t


def alloc_state(kind: str, rows: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Zeroed optimizer state, written once so the memory is resident (no surprise OOM later)."""
    shapes = [(rows, dim), (rows, dim)] if kind == "adam" else [(rows,)]
    return tuple(alloc_table(shape).zero_() for shape in shapes)


def state_floats_per_row(kind: str, dim: int) -> int:
    return 2 * dim if kind == "adam" else 1


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
