"""The one error type of the Engram services, and the machine-readable reasons it carries.

A `ShardError` is a gRPC status code, a `Reason` (what went wrong, for programs) and a message
(for people). A shard raises it and aborts the call with a rich status: a `google.rpc.Status`
whose details hold one `google.rpc.ErrorInfo(reason=..., domain="engram")` (the gRPC richer
error model, sent as the `grpc-status-details-bin` trailer). The client turns the call's error
back into a `ShardError` with the same reason (`from_rpc_error`), adding which shard, address
and call it came from. Callers branch on `error_reason(exc)`, never on the message text.

A failure with no reason is not from an Engram server: a transport failure (connection refused,
a reset stream: UNAVAILABLE with no ErrorInfo), a deadline, or a proxy's answer.

`ShardError` pickles with every field: it crosses Ray from a worker to the driver, whose
message must show the real cause, not a TypeError from rebuilding the exception.
"""

from __future__ import annotations

import enum
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

Code = grpc.StatusCode
DOMAIN = "engram"
DETAILS_KEY = "grpc-status-details-bin"


class Reason(enum.StrEnum):
    """Why a call was refused. The gRPC code says how to react in general; the reason says exactly."""

    # the request itself (INVALID_ARGUMENT, OUT_OF_RANGE, RESOURCE_EXHAUSTED for a reply too big)
    BAD_REQUEST = "BAD_REQUEST"  # a field is malformed or out of its domain; the message names it
    ROW_OUT_OF_RANGE = "ROW_OUT_OF_RANGE"  # row ids outside the table
    REPLY_TOO_LARGE = "REPLY_TOO_LARGE"  # the answer would exceed cluster.max_message_mb: split the call
    # routing (the slot map)
    EPOCH_STALE = "EPOCH_STALE"  # the caller's slot map is older than the shard's: refresh it
    EPOCH_AHEAD = "EPOCH_AHEAD"  # the shard has not installed the caller's epoch yet: retry
    SLOT_NOT_OWNED = "SLOT_NOT_OWNED"  # the shard does not serve that slot at this epoch: refresh
    SLOT_FROZEN = "SLOT_FROZEN"  # the slot is being migrated; updates wait for the new map: retry
    SLOT_MAP_REFUSED = "SLOT_MAP_REFUSED"  # a slot map that contradicts the shard or the control plane
    # training steps
    STALENESS_BOUND = "STALENESS_BOUND"  # rows would miss more steps than allowed: retry once applied
    COLLECTING_PARTS = "COLLECTING_PARTS"  # a step waits for more parts; admin calls wait for it
    STEP_FROM_PAST = "STEP_FROM_PAST"  # the step is already applied
    STEP_TOO_FAR_AHEAD = "STEP_TOO_FAR_AHEAD"  # more than cluster.max_step_jump ahead of the shard
    STEP_TOO_LATE = "STEP_TOO_LATE"  # a part of an earlier step while a later one collects parts
    PART_ALREADY_RECEIVED = "PART_ALREADY_RECEIVED"  # a part sent twice; the first one counts
    PARTS_TIMEOUT = "PARTS_TIMEOUT"  # a later step waited too long for the current step's parts
    OPTIMIZER_MISMATCH = "OPTIMIZER_MISMATCH"  # the shard keeps another optimizer's state
    READ_ONLY_TABLE = "READ_ONLY_TABLE"  # an fp8 table takes no writes
    # checkpoints and migration
    CHECKPOINT_INVALID = "CHECKPOINT_INVALID"  # missing, other version or other layout: nothing changed
    DATA_LOSS = "DATA_LOSS"  # a file or a replica does not hold what it should
    MIGRATION_REFUSED = "MIGRATION_REFUSED"  # not the shard's slots, already served, no registry to check
    MIGRATION_FAILED = "MIGRATION_FAILED"  # the receiving shard refused or failed
    MIGRATION_BEHIND = "MIGRATION_BEHIND"  # the copy lacks steps its receiver applied: migrate again
    REGISTRY_UNAVAILABLE = "REGISTRY_UNAVAILABLE"  # the control plane could not be read
    # the server itself
    OVERLOADED = "OVERLOADED"  # in-flight bytes or a queue are full: retry later, or send less
    ROWS_UNAVAILABLE = "ROWS_UNAVAILABLE"  # a worker could not read its Engram rows in time
    SHARD_DOWN = "SHARD_DOWN"  # the control plane says the shard stopped heartbeating
    TIMEOUT = "TIMEOUT"  # a server-side bound on the call's time ran out
    INTERNAL = "INTERNAL"  # a bug inside the server; the message says where
    # security (the interceptor)
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class ShardError(RuntimeError):
    """A refused or failed shard (or worker) call: `code`, `reason`, `message`, and where it came from."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: Reason | str | None = None,
        address: str = "",
        shard_id: int | None = None,
        call: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason: Reason | str | None = _as_reason(reason)
        self.address = address
        self.shard_id = shard_id
        self.call = call

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if not (self.call or self.address or self.shard_id is not None):
            return text  # raised inside the shard: nothing to say about where
        where = f"shard {self.shard_id}" if self.shard_id is not None else "shard"
        if self.address:
            where += f" at {self.address}"
        return f"{self.call or 'call'} to {where} failed: {text}"

    def __reduce__(self):
        fields = {"code": self.code.name, "message": self.message, "reason": self.reason}
        fields |= {"address": self.address, "shard_id": self.shard_id, "call": self.call}
        return _rebuild, (type(self), fields), {"notes": getattr(self, "__notes__", [])}

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        if state and state.get("notes"):
            self.__notes__ = list(state["notes"])


def _rebuild(cls: type[ShardError], fields: dict[str, Any]) -> ShardError:
    """Unpickle: the code travels by name (grpc.StatusCode values are tuples, not stable names)."""
    code, message = Code[fields.pop("code")], fields.pop("message")
    return cls(code, message, **fields)


def _as_reason(reason: Reason | str | None) -> Reason | str | None:
    if reason is None or isinstance(reason, Reason):
        return reason
    try:
        return Reason(reason)
    except ValueError:
        return str(reason)  # a reason from a newer server: kept as text, still comparable


# ---------------------------------------------------------------------------------------------
# on the wire


def rich_status(code: grpc.StatusCode, message: str, reason: Reason | str) -> grpc.Status:
    """-> a grpc.Status whose trailer carries google.rpc.Status(details=[ErrorInfo(reason, "engram")])."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=str(reason), domain=DOMAIN))
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))


async def abort(context: grpc.aio.ServicerContext, err: ShardError) -> None:
    """Abort a servicer call with `err`'s code, message and reason (always raises)."""
    st = rich_status(err.code, err.message, err.reason or _default_reason(err.code))
    await context.abort(st.code, st.details, st.trailing_metadata)


def _default_reason(code: grpc.StatusCode) -> Reason:
    return {Code.INVALID_ARGUMENT: Reason.BAD_REQUEST, Code.RESOURCE_EXHAUSTED: Reason.OVERLOADED}.get(
        code, Reason.INTERNAL
    )


def error_reason(exc: BaseException) -> Reason | str | None:
    """The reason an Engram server gave for `exc` (a ShardError or a grpc.RpcError); None if it gave none
    (a transport failure, a deadline, anything not from an Engram server)."""
    if isinstance(exc, ShardError):
        return exc.reason
    if isinstance(exc, grpc.RpcError):
        return _reason_of_call(exc)
    return None


def _reason_of_call(exc: grpc.RpcError) -> Reason | str | None:
    trailing: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != DETAILS_KEY:
            continue
        status = status_pb2.Status()
        try:
            status.MergeFromString(value)
        except Exception:  # noqa: BLE001 - a malformed trailer carries no reason
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
                return _as_reason(info.reason)
    return None


def from_rpc_error(exc: grpc.RpcError, *, address: str, shard_id: int | None, call: str) -> ShardError:
    """A failed call -> ShardError with the server's reason (None for a transport failure)."""
    code = exc.code() if hasattr(exc, "code") else Code.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return ShardError(
        code or Code.UNKNOWN,
        details or "(no details)",
        reason=_reason_of_call(exc),
        address=address,
        shard_id=shard_id,
        call=call,
    )


__all__ = ["DOMAIN", "Code", "Reason", "ShardError", "abort", "error_reason", "from_rpc_error", "rich_status"]
