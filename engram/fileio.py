"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

The one helper every layer uses: the corpus caches, checkpoints, and the client's table-load progress.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, *, durable: bool = False) -> Iterator[BinaryIO]:
    """Write a binary file via `<name>.<pid>.tmp` + rename; `durable` adds fsync of the file and its folder.

    The temp file is removed when the body raises, so no `.tmp` is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> None:
    with atomic_open(path, durable=durable) as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)
