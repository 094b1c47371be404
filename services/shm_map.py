"""Shared mappings of table files on 2 MiB boundaries, so that their rows can sit on huge pages.

A random row gather over a table of GiBs misses the TLB on nearly every row with 4 KiB pages;
with 2 MiB pages the page tables fit in the caches. A tmpfs file (/dev/shm) can hold 2 MiB
pages even where `shmem_enabled` is `never` (the default): MADV_COLLAPSE (Linux 6.1+) turns
the filled 4 KiB pages of a range into 2 MiB pages of the file, for every process mapping it.
A process then maps such a page with one page-table entry only where its address and the
file offset agree modulo 2 MiB, and `mmap.mmap` puts a mapping wherever the kernel likes.

`FileMap` reserves an anonymous range 2 MiB larger than the file and maps the file over it at
the first 2 MiB boundary (MAP_FIXED): the reservation's mmap object owns the whole range
(dropping it unmaps both) and `buf` is the file's bytes. Where that cannot be done (not Linux,
no libc) it is a plain `mmap.mmap` of the file. `collapse` is best effort: a kernel without
MADV_COLLAPSE, `shmem_enabled=deny`, or no free huge page leaves the 4 KiB pages as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import sys

import numpy as np

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22  # Linux 5.14+: map a range's pages now (mmap has no name for it before Python 3.13)
MADV_COLLAPSE = 25  # Linux 6.1+
_MAP_FIXED, _MAP_NORESERVE = 0x10, 0x4000  # Linux

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.madvise.restype = ctypes.c_int
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class FileMap:
    """A shared mapping of a whole file (`size` bytes of `fd`), 2 MiB-aligned where possible."""

    def __init__(self, fd: int, size: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.size = size
        self.aligned = False
        if _libc is not None and size >= HUGE_PAGE:
            # the reservation: only addresses (private, no swap reserved: never touched, no memory)
            self._owner = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=prot)
            start = int(np.frombuffer(self._owner, dtype=np.uint8, count=1).ctypes.data)
            skew = -start % HUGE_PAGE
            got = _libc.mmap(start + skew, size, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
            if got == start + skew:
                self.aligned = True
                self._skew = skew
                self.buf = memoryview(self._owner)[skew : skew + size]  # (size,) the file's bytes
                return
            self._owner.close()  # MAP_FIXED failed and left the reservation as it was
        self._owner = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        self._skew = 0
        self.buf = memoryview(self._owner)

    @property
    def address(self) -> int:
        return int(np.frombuffer(self.buf, dtype=np.uint8, count=1).ctypes.data) if self.size else 0

    def madvise(self, advice: int, offset: int, nbytes: int) -> None:
        """madvise(2) on [offset, offset + nbytes) of the file; OSError when the kernel refuses."""
        self._owner.madvise(advice, self._skew + offset, nbytes)

    def collapse(self, offset: int, nbytes: int, *, piece: int = 64 << 20) -> int:
        """Back [offset, offset + nbytes) with 2 MiB pages where its filled 4 KiB pages allow (the
        whole 2 MiB units inside it) -> bytes collapsed, 0 when the kernel cannot. In `piece`-sized
        calls without the GIL: it runs beside serving, and each call holds only its own pages."""
        if _libc is None or not self.aligned or nbytes < HUGE_PAGE:
            return 0
        base = self.address
        first = -(-(base + offset) // HUGE_PAGE) * HUGE_PAGE
        end = (base + offset + nbytes) // HUGE_PAGE * HUGE_PAGE
        done = 0
        for a in range(first, end, piece):
            n = min(piece, end - a)
            if _libc.madvise(a, n, MADV_COLLAPSE) == 0:
                done += n
            elif ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
                break  # no MADV_COLLAPSE here (older kernel, THP off, shmem_enabled=deny): stop asking
        return done
