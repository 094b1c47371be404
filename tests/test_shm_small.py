"""Row-by-row shared-memory reads (services/client/shm_small.py) against real table files.

Two "shards" write their files with the shard's own writer (`ShmTable`), each holding every
other slot; the client maps them read-only. A small read must give exactly the rows of the
general numpy reader, and must refuse (None: the caller takes the numpy path) whenever that
reader would not answer at once: an update in progress, a retired file, a slot the file does
not hold, rows too stale for the step.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch

from services.client.shm_reader import ShmTableReader
from services.client.shm_small import small_reads_for
from services.shard.shm_table import ShmTable

SLOTS, PER_SLOT, DIM = 16, 5, 8
NUM_ROWS = SLOTS * PER_SLOT  # global row i: slot i % SLOTS, index i // SLOTS inside it


def _files(tmp_path, *, mirror: torch.dtype | None = torch.bfloat16, hole: int | None = None):
    """Two shards' files (shard k owns the slots s % 2 == k) -> (writers, readers, owners, full (R, D) fp32 table)."""
    rng = np.random.default_rng(0)
    full = torch.from_numpy(rng.standard_normal((NUM_ROWS, DIM)).astype(np.float32))
    owners = np.arange(SLOTS) % 2
    writers, readers = {}, {}
    for shard in (0, 1):
        mine = [s for s in range(SLOTS) if owners[s] == shard]
        base = np.full(SLOTS, -1, dtype=np.int64)
        for k, s in enumerate(mine):
            base[s] = k * PER_SLOT
        if hole is not None and owners[hole] == shard:
            base[hole] = -1  # the map says this shard owns the slot, its file does not hold it
        token = secrets.token_bytes(16)
        w = ShmTable(
            tmp_path / f"t{shard}",
            shard_id=shard,
            table=1,
            rows=len(mine) * PER_SLOT,
            dim=DIM,
            base=base,
            epoch=3,
            mirror=mirror,
            token=token,
        )
        for k, s in enumerate(mine):
            w.weights[k * PER_SLOT : (k + 1) * PER_SLOT] = full[s::SLOTS]  # rows s, s + S, ... of slot s
        if w.mirror is not None:
            w.mirror.copy_(w.weights)
        writers[shard] = w
        readers[shard] = ShmTableReader(str(w.path), token=token, dim=DIM)
    return writers, readers, owners, full


def _numpy_read(readers, owners, ids: np.ndarray, *, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((ids.size, DIM), dtype=dtype)
    for shard, reader in readers.items():
        sel = np.flatnonzero(owners[ids % SLOTS] == shard)
        part = torch.empty((sel.size, DIM), dtype=dtype)
        assert isinstance(reader.read(ids[sel], part, epoch=3), int)
        out[torch.from_numpy(sel)] = part
    return out


@pytest.mark.parametrize(("mirror", "dtype"), [(torch.bfloat16, torch.bfloat16), (None, torch.float32)])
def test_small_reads_equal_the_numpy_reader(tmp_path, mirror, dtype) -> None:
    writers, readers, owners, full = _files(tmp_path, mirror=mirror)
    writers[0].set_applied(7)
    writers[1].set_applied(5)
    small = small_reads_for(readers, owners, epoch=3, dtype=dtype)
    assert small is not None
    ids = np.random.default_rng(1).choice(NUM_ROWS, 24, replace=False)
    got = small.read(ids.tolist(), step=0, max_staleness=0)
    assert got is not None
    rows, applied, shards_read = got
    assert torch.equal(rows.view(torch.uint8), _numpy_read(readers, owners, ids, dtype=dtype).view(torch.uint8))
    assert torch.equal(rows.float(), full[torch.from_numpy(ids)].to(dtype).float())
    assert (applied, shards_read) == (5, 2)  # the oldest of the shards read
    only0 = [int(i) for i in ids if owners[i % SLOTS] == 0]
    _, applied0, read0 = small.read(only0, step=0, max_staleness=0)
    assert (applied0, read0) == (7, 1)  # a shard that was not read does not count


def test_small_reads_refuse_what_the_numpy_reader_would_not_answer_now(tmp_path) -> None:
    writers, readers, owners, _ = _files(tmp_path, hole=4)
    small = small_reads_for(readers, owners, epoch=3, dtype=torch.bfloat16)
    assert small is not None
    on0, on1 = [2, 18, 34], [1, 17]  # slots 2 (shard 0) and 1 (shard 1)
    assert small.read(on0 + on1, step=0, max_staleness=0) is not None
    assert small.read([4], step=0, max_staleness=0) is None  # slot 4: not in shard 0's file
    writers[1].begin_write()  # an update is writing shard 1's rows
    assert small.read(on0 + on1, step=0, max_staleness=0) is None
    assert small.read(on0, step=0, max_staleness=0) is not None  # shard 0 alone is unaffected
    writers[1].end_write(applied_step=9)
    writers[0].set_applied(2)
    assert small.read(on0, step=5, max_staleness=1) is None  # step 5 needs step >= 3 applied
    assert small.read(on0, step=4, max_staleness=1)[1] == 2
    writers[1].retire()
    assert small.read(on1, step=0, max_staleness=0) is None


def test_small_reads_need_current_files_in_the_wire_dtype(tmp_path) -> None:
    _, readers, owners, _ = _files(tmp_path)
    assert small_reads_for(readers, owners, epoch=4, dtype=torch.bfloat16) is None  # files of epoch 3
    assert small_reads_for(readers, owners, epoch=3, dtype=torch.float16) is None  # a bf16 mirror only
    assert small_reads_for({0: readers[0]}, owners, epoch=3, dtype=torch.bfloat16) is None  # shard 1 unmapped
