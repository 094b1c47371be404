"""The co-located row path: read a shard's table in place from its file under cluster.shm_dir.

The shard publishes each table as a file (layout and consistency: services/shard/shm_table.py);
a client on the same host maps it read-only and gathers the rows itself, no round trip:

    positions (n,) = base[id % num_slots] + id // num_slots       (base from the file)
    rows (n, D)    = mirror[positions]  (whole-row copies)  or  weights[positions] rounded

under the file's seqlock: SEQ even before, unchanged after, else gather again. The pages of
the rows a read gathers from are mapped into this process once, on its first read (`populate`),
so reads take no page faults. A file of another epoch, a retired file, a row of a slot the
file does not hold, or a writer that keeps the seqlock busy make `read` answer why instead of
rows; the caller then takes another path.
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from services.client.routing import slot_of
from services.shard.gather import gather_into, void_rows
from services.shard.shm_table import (
    BASE_OFFSET,
    H_APPLIED_STEP,
    H_DIM,
    H_EPOCH,
    H_MAGIC,
    H_MIRROR_DTYPE,
    H_MIRROR_OFFSET,
    H_NUM_SLOTS,
    H_RETIRED,
    H_ROWS,
    H_SEQ,
    H_SIZE,
    H_VERSION,
    H_WEIGHTS_OFFSET,
    HEADER_WORDS,
    MAGIC,
    VERSION,
    header_token,
    mapped,
)
from services.shm_map import MADV_POPULATE_READ, FileMap
from services.wire import TORCH_DTYPES

SEQ_TRIES = 64  # gathers tried while updates keep overlapping, then the caller takes another path
PAGE = mmap.PAGESIZE


def rows_tensor(dtype: torch.dtype, dim: int) -> torch.Tensor:
    """An empty (0, D) tensor (frombuffer refuses an empty buffer)."""
    return torch.empty((0, dim), dtype=dtype)


class ShmUnavailable(Exception):
    """The file cannot be used (missing, not this shard's, malformed): the reason is the message."""


@dataclass(frozen=True, slots=True)
class Miss:
    """Why `read` returned no rows: retired | epoch | moved | stale | busy."""

    reason: str
    epoch: int = 0
    applied_step: int = 0


class ShmTableReader:
    def __init__(self, path: str, *, token: bytes, dim: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ShmUnavailable(f"cannot open {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < BASE_OFFSET:
                raise ShmUnavailable(f"{path}: {size} bytes, too small for a table file")
            self.map = FileMap(fd, size, writable=False)  # 2 MiB-aligned: the shard's huge pages map whole
        except OSError as exc:
            raise ShmUnavailable(f"cannot map {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        self.path = path
        buf = self.map.buf
        h = self.header = np.frombuffer(buf, dtype="<u8", count=HEADER_WORDS)  # (512,) uint64, live
        if int(h[H_MAGIC]) != MAGIC or int(h[H_VERSION]) != VERSION:
            raise ShmUnavailable(f"{path}: not an Engram table file of version {VERSION}")
        if header_token(h) != token:
            raise ShmUnavailable(
                f"{path}: belongs to another shard process than the registered one (a stale "
                "file, or another host's /dev/shm)"
            )
        rows, self.dim, num_slots = int(h[H_ROWS]), int(h[H_DIM]), int(h[H_NUM_SLOTS])
        if self.dim != dim or int(h[H_SIZE]) != size:
            raise ShmUnavailable(
                f"{path}: {self.dim}-dim rows and {size} bytes, expected {dim}-dim rows and {int(h[H_SIZE])} bytes"
            )
        self.epoch = int(h[H_EPOCH])
        self.num_slots = num_slots
        self.base = np.frombuffer(buf, dtype="<i8", count=num_slots, offset=BASE_OFFSET).copy()  # (S,)
        self.shift = num_slots.bit_length() - 1 if num_slots & (num_slots - 1) == 0 else -1
        with warnings.catch_warnings():  # read-only mapping: these tensors are only ever read
            warnings.simplefilter("ignore", UserWarning)
            self.weights = mapped(buf, torch.float32, rows=rows, dim=dim, offset=int(h[H_WEIGHTS_OFFSET]))  # (R, D)
            code = int(h[H_MIRROR_DTYPE])
            self.mirror = (
                None
                if not code
                else mapped(buf, TORCH_DTYPES[code], rows=rows, dim=dim, offset=int(h[H_MIRROR_OFFSET]))
            )  # (R, D)
        self._whole_rows = {t.dtype: void_rows(t) for t in (self.weights, self.mirror) if t is not None}  # (R,) each
        self._regions = {torch.float32: (int(h[H_WEIGHTS_OFFSET]), rows * dim * 4)}  # dtype -> (offset, bytes)
        if self.mirror is not None:
            self._regions[self.mirror.dtype] = (int(h[H_MIRROR_OFFSET]), rows * dim * self.mirror.element_size())
        self._populated: set[torch.dtype] = set()
        self._all_owned = bool(num_slots) and int(self.base.min()) >= 0  # then no per-read ownership check

    @property
    def header_words(self) -> memoryview:
        """The live header as (512,) uint64 words: reads of python ints, no numpy scalar per word."""
        return self.map.buf[: HEADER_WORDS * 8].cast("Q")

    def row_bytes(self, dtype: torch.dtype) -> memoryview | None:
        """The rows stored in `dtype` (mirror or weights) as one byte view, row r at r * D * itemsize; None if none."""
        if dtype not in self._whole_rows:
            return None
        offset, nbytes = self._regions[dtype]
        return self.map.buf[offset : offset + nbytes]

    @property
    def retired(self) -> bool:
        return bool(self.header[H_RETIRED])

    def populate(self, dtype: torch.dtype) -> None:
        """Map every page of the rows a `dtype` read gathers from (the mirror or the weights) now.

        Without it each first touch of a 4 KiB page of the shard's file is a minor page fault in
        this process: random rows touch a new page almost every row until the whole table has
        been read once, which costs more than the gather itself.
        """
        src = dtype if dtype in self._whole_rows else torch.float32
        if src in self._populated:
            return
        self._populated.add(src)
        offset, nbytes = self._regions[src]
        if not nbytes:
            return
        try:
            self.map.madvise(MADV_POPULATE_READ, offset, nbytes)
        except (OSError, ValueError):  # an older kernel: touch one byte per page instead
            np.frombuffer(self.map.buf, dtype=np.uint8, count=nbytes, offset=offset)[::PAGE].max()

    def positions(self, ids: np.ndarray) -> np.ndarray | None:
        """(n,) ids -> (n,) positions, or None if a row's slot is not in this file."""
        pos = self.base[slot_of(ids, self.num_slots)]  # (n,) slot starts
        if not self._all_owned and pos.size and pos.min() < 0:
            return None
        pos += (ids >> self.shift) if self.shift >= 0 else ids // self.num_slots
        return pos

    def read(
        self,
        ids: np.ndarray,
        out: torch.Tensor | None = None,
        *,
        rows: np.ndarray | None = None,
        dtype: torch.dtype | None = None,
        epoch: int,
        step: int = 0,
        max_staleness: int = 0,
    ) -> int | Miss:
        """out (n, D) <- rows of ids (n,) -> the table's applied step (the rows are at least that new).

        Either `out`, or `rows` (n,) opaque rows of D values in `dtype` (a numpy buffer, no torch
        call: `routing.new_rows`); given both, `rows` is out's memory."""
        h = self.header
        if h[H_RETIRED]:
            return Miss("retired")
        if self.epoch != epoch:
            return Miss("epoch", epoch=self.epoch)
        pos = self.positions(ids)
        if pos is None:
            return Miss("moved")
        if out is not None:
            dtype = out.dtype
        elif dtype is None or rows is None:
            raise ValueError("ShmTableReader.read: give `out`, or `rows` with their `dtype`")
        self.populate(dtype)  # once per source; a set lookup after that
        src = self._whole_rows.get(dtype)  # the mirror or the weights in the wire dtype: whole-row copies
        if src is not None and rows is None:
            assert out is not None  # (given when rows are not)
            rows = void_rows(out)
        elif src is None and out is None:  # fp32 rows rounded on the way: gather_into writes an (n, D) tensor
            assert rows is not None
            out = (
                torch.frombuffer(rows, dtype=dtype).view(rows.size, self.dim)
                if rows.size
                else rows_tensor(dtype, self.dim)
            )
        for attempt in range(SEQ_TRIES):
            seq = int(h[H_SEQ])
            if seq & 1:  # an update is writing rows right now
                time.sleep(0 if attempt < 8 else 50e-6)
                continue
            applied = int(h[H_APPLIED_STEP])
            if step and step - 1 - applied > max_staleness:
                return Miss("stale", applied_step=applied)
            if src is not None:
                src.take(pos, out=rows, mode="clip")  # ids checked: no buffering
            else:
                assert out is not None
                gather_into(self.weights, torch.from_numpy(pos), out)  # fp32 rounded to the wire dtype on the way
            if int(h[H_SEQ]) == seq:
                return applied
        return Miss("busy")
