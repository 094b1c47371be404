"""The safetensors file format, streamed: read tensors as memory maps, write them region by region.

    8 bytes   N, little-endian uint64
    N bytes   JSON header {"__metadata__": {str: str}?, name: {"dtype", "shape", "data_offsets": [a, b]}, ...}
              padded with spaces to a multiple of 8
    data      each tensor's bytes at [8 + N + a, 8 + N + b), row-major, little-endian

`read_header` checks everything a header claims against the file before any byte of data is
used (sizes, offsets inside the file, dtype and shape agreeing with the byte count), so a
truncated or malformed file is refused with a message that says where. `TensorFile.rows`
maps a 2-D tensor read-only (numpy memmap): a strided slice reads only the pages it touches,
never the whole tensor. `write_header` lays out a file the way the safetensors library does
(tensors ordered by dtype, largest first, then name; header padded with spaces), so a file
written here from the same tensors is byte-identical to `safetensors.torch.save_file`'s.
`sha256_region` hashes a tensor's bytes in bounded blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 100 << 20  # the safetensors library refuses larger headers too
_READ_BLOCK = 8 << 20
# the library's Dtype enum, in declaration order (its sort key); bytes per element
DTYPE_ORDER = (
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
)
ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


class SafetensorsError(ValueError):
    """A file is not a well-formed safetensors file; the message says which and where."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


@dataclass(frozen=True, slots=True)
class TensorFile:
    path: Path
    size: int
    data_start: int
    metadata: dict[str, str] | None
    tensors: dict[str, TensorEntry]

    def rows(self, name: str) -> np.ndarray:
        """(rows, cols) uint8 read-only memory map of a 1-byte-element 2-D tensor."""
        e = self.tensors[name]
        if len(e.shape) != 2 or ITEM_BYTES.get(e.dtype) != 1:
            raise SafetensorsError(f"{self.path}: {name} is {e.dtype} {list(e.shape)}, not a 2-D byte tensor")
        if e.nbytes == 0:
            return np.zeros(e.shape, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=e.start, shape=e.shape)


def read_header(path: str | Path) -> TensorFile:
    """Parse and check a safetensors header against its file (nothing of the data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsError(
                    f"{path}: truncated or not safetensors: header of {n} bytes declared, the file has {size} bytes"
                )
            raw = f.read(n)
    except OSError as exc:
        raise SafetensorsError(f"{path}: cannot read: {exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
    tensors = {}
    for name, info in header.items():
        tensors[name] = _entry(path, name, info, data_start=data_start, size=size)
    return TensorFile(path=path, size=size, data_start=data_start, metadata=metadata, tensors=tensors)


def _entry(path: Path, name: str, info: object, *, data_start: int, size: int) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{path}: tensor {name}: expected dtype, shape and data_offsets, got {info!r:.200}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise SafetensorsError(f"{path}: tensor {name}: dtype {dtype!r} is not readable here")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{path}: tensor {name}: shape {shape!r} is not a list of sizes")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"{path}: tensor {name}: data_offsets {offsets!r} are not [begin, end]")
    nbytes = int(np.prod(shape, dtype=np.int64)) * ITEM_BYTES[dtype] if shape else ITEM_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(
            f"{path}: tensor {name}: {dtype} {shape} is {nbytes} bytes, data_offsets span {offsets[1] - offsets[0]}"
        )
    if data_start + offsets[1] > size:
        raise SafetensorsError(
            f"{path}: truncated: tensor {name} ends at byte {data_start + offsets[1]}, the file has {size} bytes"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=data_start + offsets[0], nbytes=nbytes)


def sha256_region(path: str | Path, start: int, nbytes: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = nbytes
        while left:
            chunk = f.read(min(_READ_BLOCK, left))
            if not chunk:
                raise SafetensorsError(f"{path}: truncated while hashing at byte {start + nbytes - left}")
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def layout_tensors(
    specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, TensorEntry]]:
    """(name, dtype, shape) of every tensor -> (the 8-byte length + padded header, where each tensor goes).

    The library's layout: tensors sorted by dtype (its enum order, largest first), then by name,
    packed back to back; `__metadata__` first in the header; compact JSON; padded to 8 bytes.
    """
    order = sorted(specs, key=lambda s: (-DTYPE_ORDER.index(s[1]), s[0]))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset, places = 0, []
    for name, dtype, shape in order:
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEM_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        places.append((name, dtype, shape, offset, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    entries = {
        name: TensorEntry(name=name, dtype=dtype, shape=tuple(shape), start=data_start + off, nbytes=nb)
        for name, dtype, shape, off, nb in places
    }
    return struct.pack("<Q", len(raw)) + raw, entries


def create_file(path: Path, head: bytes, data_bytes: int) -> int:
    """Write the header and size the file (data filled later, region by region) -> an fd open for writing."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, head, 0)
        os.ftruncate(fd, len(head) + data_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_at(fd: int, offset: int, data: np.ndarray) -> None:
    view = np.ascontiguousarray(data).data.cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
