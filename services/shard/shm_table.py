"""Where a shard's rows live: private memory, or files under `cluster.shm_dir` that co-located
clients map and read in place (the co-located row path, services/client/shm_reader.py).

One file per table, `{shm_dir}/engram.{namespace}.shard{id}.t{table}`:

    offset 0        header, 512 little-endian uint64 words (H_* below)
    BASE_OFFSET     base (num_slots,) int64: first position of each owned slot, -1 if not owned
    weights_offset  weights (R, D) fp32, the master rows the optimizer updates in place
    mirror_offset   mirror (R, D) bf16/fp16 (optional): the weights rounded, refreshed with them

Consistency (readers never lock; see docs/consistency.md):
- H_SEQ is a seqlock: the shard makes it odd before it writes rows and even after. A reader
  reads SEQ (even), H_APPLIED_STEP, gathers, reads SEQ again; a change means an update
  overlapped and the reader gathers again. So a reader sees every row either before or after
  an applied update, never torn, and its rows are at least as new as the applied step it read.
- A file holds one slot-map epoch. A new slot map gets new files (renamed over the old names);
  the old file is marked H_RETIRED and unlinked, and readers that still map it reopen by name.
- x86-64 (TSO) ordering is assumed: stores are seen in program order, loads are not reordered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from services.shm_map import MADV_HUGEPAGE, FileMap

log = logging.getLogger("engram.shard")

MAGIC = 0x31574F524D415245  # "ERAMROW1" little-endian
VERSION = 1
HEADER_WORDS = 512
BASE_OFFSET = HEADER_WORDS * 8
ALIGN = 2 << 20  # row arrays start on 2 MiB boundaries (huge pages where tmpfs allows them)
(
    H_MAGIC,
    H_VERSION,
    H_SEQ,
    H_APPLIED_STEP,
    H_EPOCH,
    H_RETIRED,
    H_SHARD,
    H_TABLE,
    H_ROWS,
    H_DIM,
    H_NUM_SLOTS,
    H_MIRROR_DTYPE,
    H_WEIGHTS_OFFSET,
    H_MIRROR_OFFSET,
    H_TOKEN0,
    H_TOKEN1,
    H_SIZE,
    H_PID,
) = range(18)
MIRROR_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIRROR_CODES = {torch.bfloat16: 2, torch.float16: 3}  # = shard_pb2.WireDtype BF16 / FP16 (checked in tests)


def local_host_id(configured: str) -> str:
    """cluster.host_id, or this machine's hostname when it is empty."""
    return configured or socket.gethostname()


def mapped(buf, dtype: torch.dtype, *, rows: int, dim: int, offset: int) -> torch.Tensor:
    """(rows, dim) tensor on buf at offset (an empty one for a shard owning no rows)."""
    if rows * dim == 0:
        return torch.empty((rows, dim), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=rows * dim, offset=offset).view(rows, dim)


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def table_file_name(namespace: str, shard_id: int, table: int) -> str:
    return f"engram.{namespace}.shard{shard_id}.t{table}"


def file_layout(*, rows: int, dim: int, num_slots: int, mirror: bool) -> tuple[int, int, int]:
    """-> (weights_offset, mirror_offset or 0, file size)."""
    weights_offset = _align(BASE_OFFSET + num_slots * 8)
    end = weights_offset + rows * dim * 4
    mirror_offset = _align(end) if mirror else 0
    if mirror:
        end = mirror_offset + rows * dim * 2
    return weights_offset, mirror_offset, max(end, weights_offset)


@dataclass(slots=True)
class Placement:
    """The memory of one table: weights, optional mirror, and the shared file if published."""

    weights: torch.Tensor  # (R, D) fp32
    mirror: torch.Tensor | None  # (R, D) bf16/fp16
    shm: ShmTable | None = None

    def refresh_mirror(self, idx: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        """mirror[idx] <- rows (U, D) fp32 rounded; everything when idx is None."""
        if self.mirror is None:
            return
        if idx is None:
            self.mirror.copy_(self.weights)
        else:
            assert rows is not None
            self.mirror.index_copy_(0, idx, rows.to(self.mirror.dtype))


class ShmTable:
    """The shard's side of one table file: a writable mapping, header words, row tensors."""

    def __init__(
        self,
        path: Path,
        *,
        shard_id: int,
        table: int,
        rows: int,
        dim: int,
        base: np.ndarray,
        epoch: int,
        mirror: torch.dtype | None,
        token: bytes,
    ) -> None:
        self.path = path
        weights_offset, mirror_offset, size = file_layout(
            rows=rows, dim=dim, num_slots=base.size, mirror=mirror is not None
        )
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self.inode = os.fstat(fd).st_ino
            os.ftruncate(fd, size)
            self.map = FileMap(fd, size, writable=True)  # 2 MiB-aligned: its rows can sit on huge pages
        finally:
            os.close(fd)
        with contextlib.suppress(Exception):  # best effort; tmpfs honours it with shmem_enabled=advise
            self.map.madvise(MADV_HUGEPAGE, weights_offset, size - weights_offset)
        buf = self.map.buf
        self.header = np.frombuffer(buf, dtype="<u8", count=HEADER_WORDS)  # (512,) uint64
        np.frombuffer(buf, dtype="<i8", count=base.size, offset=BASE_OFFSET)[:] = base
        self.weights = mapped(buf, torch.float32, rows=rows, dim=dim, offset=weights_offset)  # (R, D)
        self.mirror = (
            None if mirror is None else mapped(buf, mirror, rows=rows, dim=dim, offset=mirror_offset)
        )  # (R, D)
        self.regions = [(weights_offset, self.weights.nbytes)]  # (offset, bytes) of the row arrays
        if self.mirror is not None:
            self.regions.append((mirror_offset, self.mirror.nbytes))
        h = self.header
        h[H_VERSION], h[H_SEQ], h[H_APPLIED_STEP], h[H_EPOCH], h[H_RETIRED] = VERSION, 0, 0, epoch, 0
        h[H_SHARD], h[H_TABLE], h[H_ROWS], h[H_DIM], h[H_NUM_SLOTS] = shard_id, table, rows, dim, base.size
        h[H_MIRROR_DTYPE] = 0 if mirror is None else MIRROR_CODES[mirror]
        h[H_WEIGHTS_OFFSET], h[H_MIRROR_OFFSET], h[H_SIZE] = weights_offset, mirror_offset, size
        h[H_TOKEN0], h[H_TOKEN1] = np.frombuffer(token, dtype="<u8")
        h[H_PID] = os.getpid()
        h[H_MAGIC] = MAGIC  # last: a reader that sees the magic sees a complete header

    def collapse(self) -> tuple[int, int]:
        """Back the filled row arrays with 2 MiB pages where the kernel can -> (bytes collapsed, bytes)."""
        done = sum(self.map.collapse(offset, nbytes) for offset, nbytes in self.regions)
        return done, sum(nbytes for _, nbytes in self.regions)

    def begin_write(self) -> None:
        self.header[H_SEQ] += 1  # odd: rows are being written

    def end_write(self, applied_step: int | None = None) -> None:
        if applied_step is not None:
            self.header[H_APPLIED_STEP] = applied_step
        self.header[H_SEQ] += 1  # even again

    def set_applied(self, step: int) -> None:
        self.header[H_APPLIED_STEP] = step

    def set_epoch(self, epoch: int) -> None:
        """Same rows, a newer slot map (a failover elsewhere): readers at the new epoch may read them."""
        self.begin_write()
        self.header[H_EPOCH] = epoch
        self.end_write()

    def retire(self) -> None:
        self.header[H_RETIRED] = 1

    def unlink(self) -> None:
        """Remove the name if it is still this file's (another process may have replaced it)."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()


class TableMemory:
    """Allocates table memory for a store: shared files when `shm_dir` works, else private."""

    def __init__(
        self, *, mirror: str = "", shm_dir: str = "", namespace: str = "", shard_id: int = 0, huge_pages: bool = True
    ) -> None:
        self.mirror_dtype = MIRROR_DTYPES.get(mirror) if mirror else None
        self.huge_pages = huge_pages
        self.shard_id = shard_id
        self.namespace = namespace
        self.token = secrets.token_bytes(16)  # tells a reader this file is this shard process's
        self.dir: Path | None = None
        self.reason = "no shm_dir configured"
        self.published: dict[int, ShmTable] = {}
        self._serial = 0
        if shm_dir:
            self.dir = self._usable_dir(Path(shm_dir))

    def _usable_dir(self, path: Path) -> Path | None:
        if not path.is_dir():
            self.reason = f"cluster.shm_dir {path} is not a directory"
        elif not os.access(path, os.W_OK | os.X_OK):
            self.reason = f"cluster.shm_dir {path} is not writable"
        else:
            self.reason = ""
            sweep_dead_tables(path, f"engram.{self.namespace}.shard{self.shard_id}.")  # an earlier, killed process's
            return path
        log.warning(
            "shard %d keeps its tables in private memory: %s (co-located clients use the TCP data plane)",
            self.shard_id,
            self.reason,
        )
        return None

    @property
    def shared(self) -> bool:
        return self.dir is not None

    def allocate(self, *, table: int, rows: int, dim: int, base: np.ndarray, epoch: int, alloc_private) -> Placement:
        """A new table's memory; `alloc_private(shape)` makes private fp32 tensors."""
        if self.dir is not None:
            self._serial += 1
            path = self.dir / f".{table_file_name(self.namespace, self.shard_id, table)}.{os.getpid()}.{self._serial}"
            try:
                shm = ShmTable(
                    path,
                    shard_id=self.shard_id,
                    table=table,
                    rows=rows,
                    dim=dim,
                    base=base,
                    epoch=epoch,
                    mirror=self.mirror_dtype,
                    token=self.token,
                )
                return Placement(weights=shm.weights, mirror=shm.mirror, shm=shm)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    path.unlink()
                self.reason = f"cannot create {path}: {exc}"
                log.warning("shard %d keeps table %d in private memory: %s", self.shard_id, table, self.reason)
        weights = alloc_private((rows, dim))
        mirror = None if self.mirror_dtype is None else torch.empty((rows, dim), dtype=self.mirror_dtype)
        return Placement(weights=weights, mirror=mirror)

    def publish(self, placements: dict[int, Placement]) -> None:
        """Make these tables the ones readers find by name; retire and unlink the ones they replace."""
        for table, p in placements.items():
            old = self.published.pop(table, None)
            if p.shm is not None:
                assert self.dir is not None
                final = self.dir / table_file_name(self.namespace, self.shard_id, table)
                os.replace(p.shm.path, final)  # atomic: a reader opens the old or the new file
                p.shm.path = final
                self.published[table] = p.shm
            if old is not None:
                old.retire()
                old.unlink()  # a no-op when the new file took its name
        fresh = [p.shm for p in placements.values() if p.shm is not None]
        if self.huge_pages and fresh:
            threading.Thread(target=self._collapse, args=(fresh,), name="engram-huge-pages", daemon=True).start()

    def _collapse(self, tables: list[ShmTable]) -> None:
        """Beside serving: the filled files onto 2 MiB pages (services/shm_map.py), logged once."""
        t0 = time.perf_counter()
        done = total = 0
        for shm in tables:
            got, nbytes = shm.collapse()
            done, total = done + got, total + nbytes
        how = "on 2 MiB pages" if done else "on 4 KiB pages (the kernel collapsed none: MADV_COLLAPSE needs Linux 6.1+)"
        log.info(
            "shard %d: %d MiB of its %d MiB of table rows %s (%.2f s)",
            self.shard_id,
            done >> 20,
            total >> 20,
            how,
            time.perf_counter() - t0,
        )

    def files(self) -> dict[int, str]:
        return {t: s.path.name for t, s in self.published.items()}

    def close(self) -> None:
        """Retire and unlink every published file (the memory goes when the last mapping does)."""
        for shm in self.published.values():
            shm.retire()
            shm.unlink()
        self.published.clear()


def sweep_dead_tables(shm_dir: Path, prefix: str = "engram.", *, headerless: bool = True) -> int:
    """Retire and unlink the table files under `shm_dir` named `prefix*` whose writer no longer runs
    (a shard killed before it could unlink them) -> how many. Readers that still map one reopen by
    name and find the live shard's file, or fall back to the network. `headerless=False` leaves
    files without a table header (another program's, or one being created) alone."""
    swept = 0
    names = [*shm_dir.glob(prefix + "*"), *(shm_dir.glob("." + prefix + "*") if headerless else [])]
    for stale in names:
        pid = _writer_pid(stale)
        if pid < 0 or (pid == 0 and not headerless) or _running(pid):
            continue  # unreadable (cannot tell), not a table file, or its writer still runs
        _retire_file(stale)
        with contextlib.suppress(OSError):
            stale.unlink()
            swept += 1
    return swept


def _writer_pid(path: Path) -> int:
    """The pid in a table file's header; 0 when it has no table header; -1 when unreadable."""
    try:
        with path.open("rb") as f:
            head = np.frombuffer(f.read(8 * (H_PID + 1)), dtype="<u8")
    except (OSError, ValueError):
        return -1
    return int(head[H_PID]) if head.size > H_PID and int(head[H_MAGIC]) == MAGIC else 0


def _running(pid: int) -> bool:
    """Does the process that wrote a table file (pid from its header, 0: none) still run, in this
    PID namespace? This process's own pid counts as gone: its files are the ones it is replacing."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process: leave its files
    return True


def _retire_file(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError), path.open("r+b") as f:
        head = np.frombuffer(f.read(8 * (H_RETIRED + 1)), dtype="<u8")
        if head.size > H_RETIRED and int(head[H_MAGIC]) == MAGIC:
            f.seek(8 * H_RETIRED)
            f.write(np.array([1], dtype="<u8").tobytes())


def header_token(header: np.ndarray) -> bytes:
    return header[H_TOKEN0 : H_TOKEN1 + 1].astype("<u8").tobytes()
