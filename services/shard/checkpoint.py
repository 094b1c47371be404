"""Per-slot checkpoint files: written atomically, verified completely before any restore.

One file per (table, slot), at `<root>/<name>/table<T>/slot<SSSSS>.bin`, where `root` is the shard's
`cluster.checkpoint_dir` and `name` the checkpoint's name (`checkpoint_dir(root, name)`: relative
components of [A-Za-z0-9._-], none starting with a dot, so no `..`, no absolute path, and no
symlink out of the root). Requests name checkpoints, never paths.

    header  48 bytes, little-endian (_HEADER): magic b"ENGSLOT1", format version, table, slot,
            num_slots, rows, dim, optimizer kind (0 adam, 1 adagrad), row format (0 fp32, 1 bf16,
            2 fp16, 3 fp8; a byte that was padding, so older fp32 files read unchanged), applied step
    weights (rows, dim) in the row format (fp8: (rows, dim + dim/32) bytes, values then scales)
    state   adam: m (rows, dim) then v (rows, dim) fp32 ; adagrad: acc (rows,) fp32 ; none for fp8

The sha256 of the whole file is returned in the SlotFile (and so lands in the manifest); a restore
needs it (an empty or malformed sha256 is refused). Errors name the checkpoint and the slot file,
never what a file holds.
Writing: tmp file -> write -> flush -> fsync -> rename -> fsync of the directory.
Restoring is two passes: `verify_slot` checks existence, size, header and sha256 of every
file (nothing is touched if any is bad), then `load_slot` reads each file straight into the
live table's slot block (no second copy of the table in memory) and re-hashes what it read;
a file changed between the two passes (a concurrent writer) is reported as DATA_LOSS.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram.row_format import row_nbytes
from services.shard.errors import Code, Reason, ShardError, invalid, precondition
from services.shard.row_store_format import read_only
from services.shard.store import SlotData

MAGIC = b"ENGSLOT1"
FORMAT_VERSION = 1
KIND_CODES = {"adam": 0, "adagrad": 1}
FORMAT_CODES = {"fp32": 0, "bf16": 1, "fp16": 2, "fp8": 3}
_HEADER = struct.Struct("<8sIiiIQIBB2xQ")  # magic, version, table, slot, num_slots, rows, dim, kind, format, step
_READ_BLOCK = 8 << 20
_PARTLY = "table partly restored: restore again from an intact checkpoint"
_NAME_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_NAME_CHARS = 255


@dataclass(frozen=True, slots=True)
class SlotMeta:
    """What a slot file must hold, from this shard's layout."""

    table: int
    slot: int
    num_slots: int
    rows: int
    dim: int
    kind: str
    fmt: str = "fp32"  # the table's storage format (engram.row_format)

    @property
    def state_floats(self) -> int:
        if read_only(self.fmt):
            return 0
        return self.rows * (2 * self.dim if self.kind == "adam" else 1)

    @property
    def file_bytes(self) -> int:
        return _HEADER.size + self.rows * row_nbytes(self.fmt, self.dim) + 4 * self.state_floats


def slot_path(table: int, slot: int) -> str:
    return f"table{table}/slot{slot:05d}.bin"


def _arrays(block: SlotData) -> list[np.ndarray]:
    """The slot's tensors as contiguous numpy views, in file order."""
    return [t.contiguous().view(torch.uint8).numpy() for t in (block.weights, *block.state)]


def write_slot(directory: str | Path, meta: SlotMeta, block: SlotData) -> dict:
    """Write one slot file atomically (the caller fsyncs the directory) -> SlotFile fields."""
    rel = slot_path(meta.table, meta.slot)
    path = Path(directory) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _inside(Path(directory).resolve(), path):
        raise invalid(f"{rel} is a symlink out of the checkpoint directory: not writing through it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        meta.table,
        meta.slot,
        meta.num_slots,
        meta.rows,
        meta.dim,
        KIND_CODES[meta.kind],
        FORMAT_CODES[meta.fmt],
        block.applied_step,
    )
    digest = hashlib.sha256(header)
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for arr in _arrays(block):
                view = arr.data.cast("B")
                digest.update(view)
                f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "table": meta.table,
        "slot": meta.slot,
        "path": rel,
        "sha256": digest.hexdigest(),
        "num_rows": meta.rows,
        "num_bytes": meta.file_bytes,
    }


def _inside(root: Path, path: Path) -> bool:
    real = path.resolve()  # follows every symlink on the way, existing or not
    return real == root or root in real.parents


def checkpoint_dir(root: str | Path, name: str) -> Path:
    """The directory of checkpoint `name` under the checkpoint root; anything else is INVALID_ARGUMENT."""
    if not name:
        raise invalid(
            "name: required (a checkpoint name under the shard's cluster.checkpoint_dir, e.g. run1/step_000100)"
        )
    parts = name.split("/")
    if len(name) > MAX_NAME_CHARS or not all(_NAME_PART.fullmatch(p) for p in parts):
        raise invalid(
            f"name: {name[:80]!r} is not a checkpoint name (relative, '/'-separated parts of letters, digits, "
            f"'.', '_', '-', none starting with '.', at most {MAX_NAME_CHARS} characters; no '..', no absolute path)"
        )
    base = Path(root).resolve()
    path = base.joinpath(*parts)
    if not _inside(base, path):
        raise invalid(f"name: {name!r} leads out of the checkpoint root through a symlink")
    return path


def resolve(directory: str | Path, rel: str, *, table: int, slot: int) -> Path:
    """A manifest's slot file: exactly `slot_path(table, slot)`, and no symlink out of the checkpoint."""
    if rel != slot_path(table, slot):
        raise invalid(f"files: table {table} slot {slot}: path {rel[:80]!r} must be {slot_path(table, slot)!r}")
    path = Path(directory) / rel
    if not _inside(Path(directory).resolve(), path):
        raise invalid(f"files: table {table} slot {slot}: {rel} is a symlink out of the checkpoint")
    return path


def check_sha256(sha256: str, *, table: int, slot: int) -> None:
    if not _SHA256.fullmatch(sha256):
        raise invalid(
            f"files: table {table} slot {slot}: sha256 must be 64 lowercase hex digits "
            f"({'empty' if not sha256 else f'{len(sha256)} characters'}); restore refused, tables unchanged"
        )


def _data_loss(rel: str, what: str, outcome: str = "restore refused, tables unchanged") -> ShardError:
    return ShardError(Code.DATA_LOSS, f"checkpoint file {rel}: {what}; {outcome}", reason=Reason.DATA_LOSS)


def verify_slot(directory: str | Path, rel: str, sha256: str, *, meta: SlotMeta) -> int:
    """Check one file completely without loading it -> its applied step."""
    check_sha256(sha256, table=meta.table, slot=meta.slot)
    path = resolve(directory, rel, table=meta.table, slot=meta.slot)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise precondition(
            f"checkpoint file {rel} does not exist; restore refused, tables unchanged", Reason.CHECKPOINT_INVALID
        ) from None
    if size < _HEADER.size:
        raise _data_loss(rel, f"truncated: {size} bytes, shorter than the {_HEADER.size}-byte header")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
        digest.update(raw)
        step = check_header(rel, raw, meta)
        if size != meta.file_bytes:
            raise _data_loss(rel, f"truncated or padded: {size} bytes, expected {meta.file_bytes}")
        while chunk := f.read(_READ_BLOCK):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise _data_loss(rel, f"sha256 mismatch (the manifest says {sha256[:16]}...)")
    return step


def check_header(rel: str, raw: bytes, meta: SlotMeta) -> int:
    magic, version, table, slot, num_slots, rows, dim, kind, fmt, step = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise _data_loss(rel, "not an Engram slot file (bad magic)")
    if version != FORMAT_VERSION:
        raise precondition(
            f"checkpoint file {rel}: format version {version}, this shard reads {FORMAT_VERSION}",
            Reason.CHECKPOINT_INVALID,
        )
    got = (table, slot, num_slots, rows, dim, kind, fmt)
    want = (meta.table, meta.slot, meta.num_slots, meta.rows, meta.dim, KIND_CODES[meta.kind], FORMAT_CODES[meta.fmt])
    if got != want:
        names = ("table", "slot", "num_slots", "rows", "dim", "optimizer", "row format code")
        diff = ", ".join(f"{n} {g} (expected {w})" for n, g, w in zip(names, got, want, strict=True) if g != w)
        raise precondition(
            f"checkpoint file {rel} does not match this cluster's layout: {diff}", Reason.CHECKPOINT_INVALID
        )
    return int(step)


def load_slot(directory: str | Path, rel: str, sha256: str, *, meta: SlotMeta, dst: SlotData) -> None:
    """Read a verified file straight into the slot block `dst` (weights and state views)."""
    path = resolve(directory, rel, table=meta.table, slot=meta.slot)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        raw = f.read(_HEADER.size)
        digest.update(raw)
        check_header(rel, raw, meta)
        for arr in _arrays(dst):
            view = arr.data.cast("B")
            if f.readinto(view) != view.nbytes:
                raise _data_loss(rel, "changed while restoring (now shorter)", _PARTLY)
            digest.update(view)
    if digest.hexdigest() != sha256:
        raise _data_loss(rel, "changed while restoring (sha256 differs from the verified file)", _PARTLY)
