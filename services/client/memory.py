"""Process-wide malloc tuning for processes that receive large lookups (opt-in).

Every large reply lands in freshly allocated buffers (gRPC's message bytes, the (U, D)
output). glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB) with fresh
mmaps and returns freed heap tops to the kernel, so each such buffer is page-faulted in
again: on the benchmark VM ~2 us per 4 KiB page, i.e. most of the client's CPU time for a
256K-row lookup. `keep_heap()` serves blocks up to `mmap_threshold` from the heap and never
trims it, so after the first lookups the pages stay mapped (resident memory stays at its peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_heap(*, mmap_threshold: int = 256 << 20, trim_threshold: int = 2 << 30) -> bool:
    """Tune glibc malloc for this process -> True if applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    )
