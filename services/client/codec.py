"""Wire codecs of the client's hot path.

`decode_lookup_response` reads a serialized `LookupResponse` without copying its `rows`
payload: protobuf's own parser copies the bytes field twice (into its arena, then into a
new `bytes` on attribute access), which for a 64K-row batch is most of the client's CPU
time. This is a plain proto3 wire-format reader for one message type: fields in any order,
last occurrence wins, unknown fields skipped, so it accepts exactly what protobuf accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(slots=True)
class LookupReply:
    """A decoded LookupResponse; `rows` is a memoryview into the received message."""

    rows: memoryview
    dim: int = 0
    dtype: int = 0
    epoch: int = 0
    applied_step: int = 0


class DecodeError(ValueError):
    pass


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise DecodeError("truncated or oversized varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def decode_lookup_response(data: bytes) -> LookupReply:
    buf = memoryview(data)
    end = len(buf)
    reply = LookupReply(rows=buf[0:0])
    i = 0
    while i < end:
        tag, i = _varint(buf, i, end)
        field, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, i = _varint(buf, i, end)
            if field == 2:
                reply.dim = value - (1 << 64) if value >= 1 << 63 else value  # int32 sign-extends to 64 bits
            elif field == 3:
                reply.dtype = value
            elif field == 4:
                reply.epoch = value
            elif field == 5:
                reply.applied_step = value
        elif wire == _LEN:
            size, i = _varint(buf, i, end)
            if i + size > end:
                raise DecodeError(f"field {field}: {size} bytes declared, {end - i} left")
            if field == 1:
                reply.rows = buf[i : i + size]
            i += size
        elif wire == _I64:
            i += 8
        elif wire == _I32:
            i += 4
        else:
            raise DecodeError(f"field {field}: unsupported wire type {wire}")
        if i > end:
            raise DecodeError("message ends inside a field")
    return reply


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        value += 1 << 64  # negative int32/int64: ten-byte two's complement, like protobuf
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_uint_field(out: bytearray, tag: int, value: int) -> None:
    """A varint field (tag byte, value); proto3 leaves a zero value out."""
    if value:
        out.append(tag)
        _put_varint(out, value)


def encode_lookup_request(
    *,
    table: int,
    epoch: int,
    row_ids: np.ndarray,
    dtype: int,
    request_id: str = "",
    step: int = 0,
    max_staleness: int = 0,
) -> bytes:
    """A serialized LookupRequest, byte-identical to protobuf's, with one copy of the ids.

    row_ids: (n,) int64 little-endian, contiguous. `step`/`max_staleness`: training lookups
    (the shard refuses rows that miss more than `max_staleness` steps before `step`).
    """
    head = bytearray()
    _put_uint_field(head, 0x08, table)
    _put_uint_field(head, 0x10, epoch)
    if row_ids.size:
        head.append(0x1A)
        _put_varint(head, row_ids.nbytes)
    tail = bytearray()
    _put_uint_field(tail, 0x20, dtype)
    if request_id:
        rid = request_id.encode()
        tail.append(0x2A)
        _put_varint(tail, len(rid))
        tail += rid
    _put_uint_field(tail, 0x30, step)
    _put_uint_field(tail, 0x38, max_staleness)
    return b"".join((head, row_ids.data.cast("B"), tail))
