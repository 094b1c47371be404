"""Small shared-memory reads row by row in plain Python: a decode step's few rows per layer.

A decode step asks each Engram layer for a handful of rows (1 per head per N-gram order of the
new token, spread over every shard). Done with numpy, such a read costs ~25 array calls
(split by shard, positions, gather, reassembly), each a few microseconds on a small CPU, for a
few hundred bytes of rows: more than the layer's own compute. Here the same read is one pass
over the ids in Python, with everything per map worked out once:

    slot = id % num_slots -> (reader k, base) = where[slot]   (built per slot map and table)
    position = base + id // num_slots
    out[i] <- rows_k[position]                                  (one memoryview copy a row)

under each file's seqlock exactly as `ShmTableReader.read` (shm_reader.py): SEQ even and the
applied step read before, SEQ unchanged after. Anything else (an odd or moved SEQ, a retired
file, a slot the file does not hold, a staleness miss) answers None and the caller takes the
numpy path, which retries, reopens or goes over the network.
"""

from __future__ import annotations

import numpy as np
import torch

from services.client.shm_reader import ShmTableReader
from services.shard.shm_table import H_APPLIED_STEP, H_RETIRED, H_SEQ

SMALL_READ_ROWS = 64  # up to this many rows a Python pass is cheaper than the numpy calls


class SmallReads:
    """Rows of one table spread over the readers of every shard that owns slots, for one slot map."""

    def __init__(self, readers: list[ShmTableReader], owners: list[int], *, dtype: torch.dtype) -> None:
        """readers[k]: the open file of shard k of `owners` order; owners (num_slots,): index into readers per slot."""
        self.readers = readers
        self.dtype = dtype
        self.num_slots = len(owners)
        self.shift = self.num_slots.bit_length() - 1 if self.num_slots & (self.num_slots - 1) == 0 else -1
        self.headers = [r.header_words for r in readers]  # live (512,) uint64 memoryviews
        self.sources = []  # per reader: its rows in `dtype` as one byte view (mirror or weights)
        for r in readers:
            src = r.row_bytes(dtype)
            if src is None:
                raise ValueError(f"{r.path}: no rows stored in {dtype}")
            r.populate(dtype)
            self.sources.append(src)
        self.width = readers[0].dim * dtype.itemsize if readers else 0
        bases = [r.base.tolist() for r in readers]
        # where[slot]: (reader, first position of the slot in its file) or None (the file does not hold it)
        self.where: list[tuple[int, int] | None] = [
            (k, bases[k][slot]) if bases[k][slot] >= 0 else None for slot, k in enumerate(owners)
        ]

    def read(self, ids: list[int], *, step: int, max_staleness: int) -> tuple[torch.Tensor, int, int] | None:
        """(n,) ids (python ints, checked in range) -> ((n, D) rows, oldest applied step of the
        shards read, how many shards were read), or None: take the numpy path."""
        where, slots, shift = self.where, self.num_slots, self.shift
        mask = slots - 1
        places = []  # (reader, byte offset) per id
        for i in ids:
            got = where[i & mask if shift >= 0 else i % slots]
            if got is None:
                return None
            places.append((got[0], (got[1] + (i >> shift if shift >= 0 else i // slots)) * self.width))
        used = {k for k, _ in places}
        seqs, applied = {}, None
        for k in used:
            h = self.headers[k]
            seq = h[H_SEQ]
            if seq & 1 or h[H_RETIRED]:
                return None
            a = h[H_APPLIED_STEP]
            if step and step - 1 - a > max_staleness:
                return None
            seqs[k] = seq
            applied = a if applied is None else min(applied, a)
        width, sources = self.width, self.sources
        buf = bytearray(len(ids) * width)  # (n, D) rows
        out = memoryview(buf)
        at = 0
        for k, p in places:
            out[at : at + width] = sources[k][p : p + width]
            at += width
        for k, seq in seqs.items():
            if self.headers[k][H_SEQ] != seq:
                return None
        if not ids or applied is None:
            return None
        return torch.frombuffer(buf, dtype=self.dtype).view(len(ids), -1), applied, len(used)


def small_reads_for(
    readers: dict[int, ShmTableReader], owners: np.ndarray, *, epoch: int, dtype: torch.dtype
) -> SmallReads | None:
    """readers {shard: open file} for the shards of a slot map `owners` (num_slots,) -> SmallReads,
    or None when a shard has no open, current file holding its slots in `dtype`."""
    order = sorted(readers)
    index = {shard: k for k, shard in enumerate(order)}
    chosen = [readers[s] for s in order]
    if any(r.retired or r.epoch != epoch or r.row_bytes(dtype) is None for r in chosen):
        return None
    try:
        return SmallReads(chosen, [index[int(s)] for s in owners.tolist()], dtype=dtype)
    except (KeyError, ValueError):
        return None
