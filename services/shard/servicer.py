"""The MemoryShard gRPC servicer: translation only (messages in, messages out, errors to status).

Every refusal is a rich status: the code, a message for people and a `google.rpc.ErrorInfo`
reason for programs (services/errors.py).

A refused request costs one log line (rate-limited, `BadRequestLog`), never a traceback; bytes
that do not parse as the request message are refused with INVALID_ARGUMENT the same way
(the deserializer hands the handler a `Malformed` marker instead of raising inside gRPC).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError

from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.errors import Code, Reason, abort
from services.shard.engine import ShardEngine
from services.shard.errors import ShardError, invalid
from services.shard.limits import BadRequestLog
from services.telemetry import annotate, annotate_rows, record_lookup

T = TypeVar("T")
log = logging.getLogger("engram.shard")
bad_requests = BadRequestLog(log)


class Malformed:
    """What the deserializer returns for bytes that are not a valid request message."""

    def __init__(self, name: str, size: int, reason: str) -> None:
        self.error = invalid(f"request: {size} bytes are not a valid {name} ({reason})")


def _deserializer(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(cls.__name__, len(data), str(exc)[:120] or type(exc).__name__)

    return parse


async def _answer(context: grpc.aio.ServicerContext, work: Awaitable[T], what: str) -> T:
    try:
        return await work
    except ShardError as exc:
        bad_requests.note(what, exc)
        await abort(context, exc)
    except Exception as exc:  # a bug, not bad input: log it with the traceback, say so on the wire
        log.exception("%s failed", what)
        bug = ShardError(Code.INTERNAL, f"{what} failed inside the shard: {exc!r}", reason=Reason.INTERNAL)
        await abort(context, bug)
    raise AssertionError("unreachable: context.abort raises")


class MemoryShardServicer(shard_pb2_grpc.MemoryShardServicer):
    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine

    async def Lookup(self, request, context):
        annotate_rows(request.row_ids, table=request.table, epoch=request.epoch, request_id=request.request_id or None)
        t0 = time.perf_counter()
        result = await _answer(context, self.engine.lookup(request), "Lookup")
        record_lookup(time.perf_counter() - t0, result.rows, side="shard", table=request.table)
        annotate(bytes_out=result.rows_nbytes, applied_step=result.applied_step)
        return result.payload  # already a serialized LookupResponse (see add_to_server)

    async def ApplyGradients(self, request, context):
        annotate_rows(
            request.row_ids,
            table=request.table,
            epoch=request.epoch,
            step=request.step,
            grad_bytes=len(request.grads),
            part_id=request.part_id or None,
        )
        response = await _answer(context, self.engine.apply_gradients(request), "ApplyGradients")
        annotate(rows_updated=response.rows_updated, pending=response.pending, applied_step=response.applied_step)
        return response

    async def Checkpoint(self, request, context):
        return await _answer(context, self.engine.checkpoint(request), "Checkpoint")

    async def Restore(self, request, context):
        return await _answer(context, self.engine.restore(request), "Restore")

    async def MigrateSlots(self, request, context):
        return await _answer(context, self.engine.migrate_slots(request), "MigrateSlots")

    async def ImportSlots(self, request_iterator, context):
        return await _answer(context, self.engine.import_slots(_checked(request_iterator)), "ImportSlots")

    async def SetSlotMap(self, request, context):
        return await _answer(context, self.engine.set_slot_map(request), "SetSlotMap")

    async def Stats(self, request, context):
        return self.engine.stats()


async def _checked(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        if isinstance(request, Malformed):
            raise request.error
        yield request


def _refuse_malformed(handler, name: str):
    """Unary-request handlers: a Malformed request is refused before the handler sees it."""

    async def unary(request, context):
        if isinstance(request, Malformed):
            bad_requests.note(name, request.error)
            await abort(context, request.error)
        return await handler(request, context)

    return unary


PRE_SERIALIZED = {"Lookup"}  # handlers that return serialized responses


def _serialize(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(servicer: MemoryShardServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_MemoryShardServicer_to_server, but Lookup replies skip protobuf.

    Built from the service descriptor, so new RPCs in the .proto are picked up as they come.
    """
    service = shard_pb2.DESCRIPTOR.services_by_name["MemoryShard"]
    handlers = {}
    for method in service.methods:
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        out_cls = getattr(shard_pb2, method.output_type.name)
        handler = getattr(servicer, method.name)
        if not method.client_streaming:
            assert not method.server_streaming, f"{method.name}: add a streaming-response Malformed check"
            handler = _refuse_malformed(handler, method.name)
        handlers[method.name] = kind(
            handler,
            request_deserializer=_deserializer(getattr(shard_pb2, method.input_type.name)),
            response_serializer=_serialize if method.name in PRE_SERIALIZED else out_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
