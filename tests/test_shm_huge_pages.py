"""Table files on 2 MiB pages (services/shm_map.py): aligned shared mappings, MADV_COLLAPSE, and a real
shard process whose published table ends up mapped with huge pages in it and in a co-located reader.

Where the kernel can collapse tmpfs pages (Linux 6.1+, `shmem_enabled` not `deny`: this project's
machines) the tests require huge pages; elsewhere they require the 4 KiB fallback to be intact.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.client.shm_reader import ShmTableReader
from services.launcher.cluster import LocalCluster
from services.shard.shm_table import HEADER_WORDS, header_token
from services.shm_map import HUGE_PAGE, MADV_POPULATE_READ, FileMap
from tests.fixtures_procs import pid_alive

SHM = Path("/dev/shm")


def kernel_collapses_tmpfs() -> bool:
    release = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    knob = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    return release >= (6, 1) and knob.exists() and "[deny]" not in knob.read_text()


def pmd_mapped_kib(pid: int | str, path: Path) -> int:
    """Sum of ShmemPmdMapped over `pid`'s mappings of `path` (kB, from /proc/<pid>/smaps)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
            inside = line.endswith(str(path))
        elif inside and line.startswith("ShmemPmdMapped:"):
            total += int(head[1])
    return total


@pytest.fixture
def shm_file():
    path = SHM / f"engram-test-hugemap.{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        yield path, fd
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def test_file_map_is_aligned_shared_and_read_only_for_readers(shm_file) -> None:
    path, fd = shm_file
    size = 5 * HUGE_PAGE + 4096
    os.ftruncate(fd, size)
    writer = FileMap(fd, size, writable=True)
    assert writer.aligned and writer.address % HUGE_PAGE == 0
    data = np.frombuffer(writer.buf, dtype=np.uint8)
    data[:] = np.arange(size, dtype=np.uint64).astype(np.uint8)
    reader = FileMap(fd, size, writable=False)
    assert reader.aligned and reader.address % HUGE_PAGE == 0
    seen = np.frombuffer(reader.buf, dtype=np.uint8)
    assert np.array_equal(seen, data)
    assert not seen.flags.writeable  # a reader cannot write the shard's rows
    data[size - 1] = 7
    assert seen[size - 1] == 7  # one file, two mappings
    small = FileMap(fd, 4096, writable=False)  # under a huge page: a plain mmap
    assert not small.aligned and np.frombuffer(small.buf, dtype=np.uint8)[5] == 5


def test_collapse_puts_the_filled_rows_on_huge_pages_for_every_mapping(shm_file) -> None:
    path, fd = shm_file
    size = 8 * HUGE_PAGE
    os.ftruncate(fd, size)
    writer = FileMap(fd, size, writable=True)
    rows = np.frombuffer(writer.buf, dtype=np.int64)
    rows[:] = np.arange(rows.size)
    offset, nbytes = 4096, 6 * HUGE_PAGE  # unaligned: only the whole 2 MiB units inside it
    done = writer.collapse(offset, nbytes)
    assert np.array_equal(rows, np.arange(rows.size))  # contents unchanged either way
    if not kernel_collapses_tmpfs():
        assert done == 0
        return
    assert done == 5 * HUGE_PAGE
    assert pmd_mapped_kib(os.getpid(), path) >= 5 * HUGE_PAGE // 1024
    reader = FileMap(fd, size, writable=False)  # a co-located client mapping it afterwards
    reader.madvise(MADV_POPULATE_READ, 0, size)
    assert pmd_mapped_kib(os.getpid(), path) >= 2 * 5 * HUGE_PAGE // 1024
    assert np.array_equal(np.frombuffer(reader.buf, dtype=np.int64), rows)
    assert writer.collapse(0, HUGE_PAGE - 4096) == 0  # no whole unit: nothing asked


def test_a_real_shard_serves_its_table_from_huge_pages(tmp_path) -> None:
    overrides = [
        "cluster.optimizer=adagrad",
        "engram.n_head_per_ngram=8",
        "engram.n_embed_per_ngram=512",  # 64-dim rows
        "engram.table_size_per_ngram=[4099,4099]",  # 65,584 rows: 16 MiB fp32 + 8 MiB bf16 mirror
        f"cluster.checkpoint_dir={tmp_path / 'ckpt'}",
    ]
    with LocalCluster(preset="tiny", overrides=overrides, num_shards=1, log_dir=tmp_path / "logs") as cluster:
        shard = cluster.shards[0]
        files = sorted(SHM.glob(f"engram.{cluster.namespace}.shard0.t*"))
        assert files, "the shard published no table file"
        deadline = time.monotonic() + 30
        log = tmp_path / "logs"
        while time.monotonic() < deadline:
            said = [
                line for f in log.glob("*.log") for line in f.read_text().splitlines() if "MiB of table rows" in line
            ]
            if said:
                break
            time.sleep(0.2)
        assert said, "the shard never reported its pages"
        if kernel_collapses_tmpfs():
            assert "24 MiB of its 24 MiB of table rows on 2 MiB pages" in said[0], said
            assert pmd_mapped_kib(shard.pid, files[0]) >= 20 * 1024
            token = header_token(np.fromfile(files[0], dtype="<u8", count=HEADER_WORDS))
            reader = ShmTableReader(str(files[0]), token=token, dim=64)
            reader.populate(torch.bfloat16)
            assert pmd_mapped_kib(os.getpid(), files[0]) >= 6 * 1024  # the 8 MiB mirror's whole units
        else:
            assert "on 4 KiB pages" in said[0], said
        pid = shard.pid
    assert not pid_alive(pid)
