"""Frames of the TCP row data plane (services/shard/dataplane_conn.py <-> services/client/dataplane.py).

One request, then one reply, at a time on a connection; all integers little-endian.

    request  64 bytes   magic "EGRQ", version, kind, request_id, table, dtype, epoch, step,
                        max_staleness, flags (0), n_ids, body_len   then body: n_ids int64 row ids
    reply    48 bytes   magic "EGRP", status, request_id, epoch, applied_step, dim, dtype, body_len
                        then body: rows (n, dim) in dtype (status 0), or a UTF-8 message (status != 0)

`status` is a gRPC status code number (0 = OK), so errors mean what the gRPC Lookup's would.
In an error reply `dim` carries the `Reason` (services/errors.py) as its number in
`WIRE_REASONS` (0: none), the same reason a gRPC Lookup's ErrorInfo would give.
The reply's body length follows from the request (n_ids * dim * itemsize) and is checked
against the shard's limit before anything is gathered. Every field is checked on receipt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import grpc

from services.errors import Reason

REQUEST = struct.Struct("<IHHQiIQQIIQQ")
REPLY = struct.Struct("<IIQQQIIQ")
REQUEST_MAGIC = 0x51524745  # b"EGRQ"
REPLY_MAGIC = 0x50524745  # b"EGRP"
VERSION = 1
KIND_LOOKUP = 1
MAX_ERROR_BYTES = 4096
assert REQUEST.size == 64 and REPLY.size == 48

# Reason <-> number in an error reply's `dim` field. Append only: a number never changes meaning.
WIRE_REASONS: tuple[Reason, ...] = (
    Reason.BAD_REQUEST,
    Reason.ROW_OUT_OF_RANGE,
    Reason.REPLY_TOO_LARGE,
    Reason.EPOCH_STALE,
    Reason.EPOCH_AHEAD,
    Reason.SLOT_NOT_OWNED,
    Reason.SLOT_FROZEN,
    Reason.SLOT_MAP_REFUSED,
    Reason.STALENESS_BOUND,
    Reason.COLLECTING_PARTS,
    Reason.STEP_FROM_PAST,
    Reason.STEP_TOO_FAR_AHEAD,
    Reason.STEP_TOO_LATE,
    Reason.PART_ALREADY_RECEIVED,
    Reason.PARTS_TIMEOUT,
    Reason.OPTIMIZER_MISMATCH,
    Reason.READ_ONLY_TABLE,
    Reason.CHECKPOINT_INVALID,
    Reason.DATA_LOSS,
    Reason.MIGRATION_REFUSED,
    Reason.MIGRATION_FAILED,
    Reason.MIGRATION_BEHIND,
    Reason.REGISTRY_UNAVAILABLE,
    Reason.OVERLOADED,
    Reason.ROWS_UNAVAILABLE,
    Reason.SHARD_DOWN,
    Reason.TIMEOUT,
    Reason.INTERNAL,
    Reason.UNAUTHENTICATED,
    Reason.PERMISSION_DENIED,
)
REASON_NUMBER: dict[Reason, int] = {r: i + 1 for i, r in enumerate(WIRE_REASONS)}


def reason_of_number(number: int) -> Reason | None:
    """An error reply's `dim` -> its Reason; None for 0 or a number this client does not know."""
    return WIRE_REASONS[number - 1] if 0 < number <= len(WIRE_REASONS) else None


STATUS_OF: dict[grpc.StatusCode, int] = {c: c.value[0] for c in grpc.StatusCode}
CODE_OF: dict[int, grpc.StatusCode] = {v: c for c, v in STATUS_OF.items()}


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    table: int
    dtype: int
    epoch: int
    step: int
    max_staleness: int
    n_ids: int
    body_len: int
    magic: int = REQUEST_MAGIC
    version: int = VERSION
    kind: int = KIND_LOOKUP
    flags: int = 0

    def pack(self) -> bytes:
        return REQUEST.pack(
            self.magic,
            self.version,
            self.kind,
            self.request_id,
            self.table,
            self.dtype,
            self.epoch,
            self.step,
            self.max_staleness,
            self.flags,
            self.n_ids,
            self.body_len,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Request:
        (magic, version, kind, request_id, table, dtype, epoch, step, max_staleness, flags, n_ids, body_len) = (
            REQUEST.unpack(data)
        )
        return cls(
            request_id=request_id,
            table=table,
            dtype=dtype,
            epoch=epoch,
            step=step,
            max_staleness=max_staleness,
            n_ids=n_ids,
            body_len=body_len,
            magic=magic,
            version=version,
            kind=kind,
            flags=flags,
        )


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    request_id: int
    epoch: int
    applied_step: int
    dim: int
    dtype: int
    body_len: int
    magic: int = REPLY_MAGIC

    def pack(self) -> bytes:
        return REPLY.pack(
            self.magic, self.status, self.request_id, self.epoch, self.applied_step, self.dim, self.dtype, self.body_len
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Reply:
        magic, status, request_id, epoch, applied_step, dim, dtype, body_len = REPLY.unpack(data)
        return cls(
            status=status,
            request_id=request_id,
            epoch=epoch,
            applied_step=applied_step,
            dim=dim,
            dtype=dtype,
            body_len=body_len,
            magic=magic,
        )


def error_reply(
    code: grpc.StatusCode, message: str, request_id: int = 0, *, reason: Reason | str | None = None
) -> bytes:
    """A complete error frame: header (the reason's number in `dim`) + message (truncated to MAX_ERROR_BYTES)."""
    body = message.encode("utf-8", "replace")[:MAX_ERROR_BYTES]
    number = REASON_NUMBER.get(reason, 0) if isinstance(reason, Reason) else 0
    return (
        Reply(
            status=STATUS_OF[code],
            request_id=request_id,
            epoch=0,
            applied_step=0,
            dim=number,
            dtype=0,
            body_len=len(body),
        ).pack()
        + body
    )
