"""One connection of the shard's TCP row data plane (the listener: dataplane.py): lookups as
length-prefixed frames (services/frames.py).

Runs on the shard's event loop next to gRPC. Each connection is an asyncio `BufferedProtocol`
(`Connection`): the loop reads straight into the buffer the frame needs next (the 64-byte header,
then the ids into a per-connection buffer) and calls back when it is full; nothing waits in
a coroutine and no reader is registered per request. The header is checked field by field,
the reply size is computed from it and checked against the limit before anything else, the
request is validated like a gRPC Lookup (`ShardStore.plan_lookup`: epoch, table, dtype, range,
ownership, staleness), and the rows are gathered into a per-connection reply buffer and
written from the callback. Large replies are gathered by a task in 2 MiB chunks (on the loop
when they are whole-row copies, in the worker pool when rows are converted), each chunk
written as soon as it is gathered: the kernel sends one chunk while the next is gathered, and
a chunk waits while more than a chunk is unsent (a slow reader holds up nobody else). The reply
buffer is reused only once the transport has sent all of the previous reply, and a connection
holding more than WRITE_HIGH unsent bytes (a client that sends and never reads) reads no further
request until they are out.

Bad input gets an error frame with a gRPC status code and a message. After a bad header
field, a wrong length or an oversized request whose body can be skipped, and after any
lookup error, the connection stays usable; after a bad magic or version (the stream cannot
be trusted) or a truncated frame, the shard answers and closes. A client that goes away
mid-reply costs only its connection. Lookups never write.

Security (docs/transport-security.md): with `security.tls_enabled` every connection is TLS with the
shard's certificate (re-read when its files change), and with auth on the client certificate
must carry the read role, else the connection gets one PERMISSION_DENIED frame and is closed.
Without TLS the plane cannot tell who connects: with auth on the shard binds it to loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from services.errors import Reason
from services.frames import KIND_LOOKUP, REPLY, REPLY_MAGIC, REQUEST, REQUEST_MAGIC, VERSION, Request, error_reply
from services.security.roles import allows
from services.security.tls import ServerSSL, peer_role
from services.shard.engine import INLINE_LOOKUP_ROWS, ShardEngine
from services.shard.errors import Code, ShardError
from services.shard.gather import gather_into
from services.shard.store_types import LookupPlan
from services.wire import ROW_DTYPES, row_bytes, row_cols

log = logging.getLogger("engram.shard")
CHUNK_BYTES = 2 << 20  # reply bytes per gather step of a large reply
INLINE_BYTES = 256 << 10  # smaller replies are gathered in the read callback (no task)
WRITE_HIGH = 4 << 20  # unsent reply bytes at which a connection stops reading requests (pause_writing)
REFUSED_LINGER_S = 1.0  # a refused connection is closed once its request is read (FIN, not RST), or after this


FRAME_REASONS = {  # what an error frame's code means when the frame itself was refused (services/errors.py)
    Code.INVALID_ARGUMENT: Reason.BAD_REQUEST,
    Code.UNIMPLEMENTED: Reason.BAD_REQUEST,
    Code.RESOURCE_EXHAUSTED: Reason.REPLY_TOO_LARGE,
    Code.PERMISSION_DENIED: Reason.PERMISSION_DENIED,
    Code.INTERNAL: Reason.INTERNAL,
}


@dataclass(slots=True)
class FrameRules:
    """What every connection of one data plane shares: the shard, the limits, the TLS role check,
    the open connections and the count of error frames sent."""

    engine: ShardEngine
    max_reply_bytes: int
    chunk_bytes: int = CHUNK_BYTES
    ssl: ServerSSL | None = None
    need_role: str | None = None  # with TLS: the role a client certificate needs
    conns: set[Connection] = field(default_factory=set)
    errors_sent: int = 0

    @property
    def max_request_bytes(self) -> int:
        return self.max_reply_bytes  # ids: 8 bytes a row, never more than the rows' reply

    def error_frame(
        self, code: Code, message: str, *, request_id: int = 0, reason: Reason | str | None = None
    ) -> bytes:
        """An error frame; the reason defaults to what the code means on this plane (a malformed frame,
        a reply over the limit, the role check, a bug)."""
        self.errors_sent += 1
        return error_reply(code, message, request_id, reason=reason or FRAME_REASONS.get(code))

    def check_header(self, req: Request) -> tuple[Code, str] | None:
        store = self.engine.store
        if req.kind != KIND_LOOKUP:
            return Code.UNIMPLEMENTED, f"kind: {req.kind} is not a request kind (1 = lookup)"
        if req.flags:
            return Code.INVALID_ARGUMENT, f"flags: {req.flags:#x}, no flags are defined"
        if req.body_len != 8 * req.n_ids:
            return Code.INVALID_ARGUMENT, (
                f"wrong length: body_len {req.body_len} bytes, but {req.n_ids} int64 ids take {8 * req.n_ids}"
            )
        if req.table not in store.layouts:
            return Code.INVALID_ARGUMENT, f"table {req.table}: no such Engram table (layers {sorted(store.layouts)})"
        if req.dtype not in ROW_DTYPES:
            return Code.INVALID_ARGUMENT, f"dtype: {req.dtype} is not a wire dtype (1 FP32, 2 BF16, 3 FP16, 4 FP8)"
        reply = req.n_ids * row_bytes(req.dtype, store.layouts[req.table].dim)
        if reply > self.max_reply_bytes:
            return Code.RESOURCE_EXHAUSTED, (
                f"oversized request: {req.n_ids} rows make a {reply}-byte reply, the "
                f"limit is {self.max_reply_bytes} (cluster.max_message_mb); split it"
            )
        return None


_HEAD, _IDS, _SKIP, _BUSY, _REFUSED, _CLOSING = range(6)  # what a connection is reading or doing


class Connection(asyncio.BufferedProtocol):
    """One client connection: its frame state and reusable buffers."""

    def __init__(self, rules: FrameRules) -> None:
        self.rules = rules
        self.transport: asyncio.Transport | None = None
        self.head = bytearray(REQUEST.size)
        self._ids = np.empty(0, dtype="<i8")
        self._reply = np.empty(0, dtype=np.uint8)
        self._scratch = bytearray(64 << 10)
        self._state = _HEAD
        self._view = memoryview(self.head)
        self._got = 0
        self._req: Request | None = None
        self._skip: tuple[int, bytes] = (0, b"")  # (body bytes left to skip, the error frame to send after)
        self._writing = False  # over WRITE_HIGH unsent reply bytes: read no request until they are out
        self._eof = False
        self._big: asyncio.Task | None = None
        self._drain: asyncio.Future | None = None  # set while a large reply waits for its bytes to go out

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=WRITE_HIGH)  # past it: read no request until the replies are out
        self.rules.conns.add(self)
        need = self.rules.need_role
        if need is not None and self.rules.ssl is not None:
            role = peer_role(t.get_extra_info("peercert"))
            if not allows(role, need):
                why = f"this caller has '{role}'" if role else "the client certificate carries no engram role"
                self._write(
                    self.rules.error_frame(Code.PERMISSION_DENIED, f"the data plane needs the '{need}' role; {why}")
                )
                self._state = _REFUSED  # read the request, then close: FIN, not RST
                asyncio.get_running_loop().call_later(REFUSED_LINGER_S, t.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.rules.conns.discard(self)
        self._state = _CLOSING
        if self._big is not None:
            self._big.cancel()

    def pause_writing(self) -> None:
        self._writing = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._state in (_HEAD, _IDS, _SKIP, _REFUSED) and self.transport is not None:
            self.transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == _SKIP:
            return memoryview(self._scratch)[: min(len(self._scratch), self._skip[0])]
        if self._state in (_HEAD, _IDS):
            return self._view[self._got :]
        return memoryview(self._scratch)  # refused, busy or closing: nothing read here is served

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._received(nbytes)
        except Exception:
            log.exception("data plane: connection handler failed")
            self._fail("the shard's data plane failed; see its log")

    def eof_received(self) -> bool:
        """The client half-closed: a frame cut short is answered, then the connection closed."""
        if self._state == _HEAD and self._got:
            self._close_with(
                Code.INVALID_ARGUMENT,
                f"truncated frame: the connection ended after {self._got} of {REQUEST.size} header bytes",
            )
        elif self._state == _IDS:
            assert self._req is not None
            self._close_with(
                Code.INVALID_ARGUMENT,
                f"truncated frame: the connection ended after {self._got} of {self._req.body_len} id bytes",
                request_id=self._req.request_id,
            )
        elif self._state == _BUSY:
            self._eof = True  # a large reply is on its way: close once it is sent
            return True
        return False  # close (after what is written)

    # --- frames ------------------------------------------------------------------------------

    def _received(self, nbytes: int) -> None:
        state = self._state
        if state == _SKIP:
            left, frame = self._skip
            left -= nbytes
            self._skip = (left, frame)
            if not left:
                self._expect(_HEAD, memoryview(self.head))
                self._write(frame)
            return
        if state not in (_HEAD, _IDS):
            if state == _REFUSED and self.transport is not None:
                self.transport.close()
            return
        self._got += nbytes
        if self._got < len(self._view):
            return
        if state == _HEAD:
            self._on_header()
        else:
            self._on_ids()

    def _expect(self, state: int, view: memoryview) -> None:
        self._state, self._view, self._got = state, view, 0

    def _on_header(self) -> None:
        rules = self.rules
        req = self._req = Request.unpack(self.head)
        rid = req.request_id
        if req.magic != REQUEST_MAGIC or req.version != VERSION:
            self._close_with(
                Code.INVALID_ARGUMENT,
                f"bad frame: magic {req.magic:#x} version {req.version} "
                f"(expected {REQUEST_MAGIC:#x} version {VERSION}); closing",
                request_id=rid,
            )
            return
        problem = rules.check_header(req)
        if problem is not None:
            code, message = problem
            if req.body_len > rules.max_request_bytes:
                self._close_with(code, message + "; the body is too large to skip, closing", request_id=rid)
                return
            frame = rules.error_frame(code, message, request_id=rid)
            if req.body_len:
                self._state, self._skip = _SKIP, (req.body_len, frame)  # answered once the body is read
            else:
                self._expect(_HEAD, memoryview(self.head))
                self._write(frame)
            return
        if self._ids.size < req.n_ids:
            self._ids = np.empty(req.n_ids, dtype="<i8")
        self._expect(_IDS, self._ids[: req.n_ids].view(np.uint8).data)
        if not req.body_len:
            self._on_ids()

    def _on_ids(self) -> None:
        req = self._req
        assert req is not None
        self._expect(_HEAD, memoryview(self.head))
        try:
            plan = self.rules.engine.store.plan_lookup(
                table=req.table,
                epoch=req.epoch,
                ids=self._ids[: req.n_ids],
                dtype=req.dtype,
                step=req.step,
                max_staleness=req.max_staleness,
            )
        except ShardError as exc:
            self._write(self.rules.error_frame(exc.code, exc.message, request_id=req.request_id, reason=exc.reason))
            return
        self._reply_rows(req, plan)

    def _reply_rows(self, req: Request, plan: LookupPlan) -> None:
        n, dim = plan.pos.shape[0], plan.dim
        width = row_bytes(plan.dtype, dim)
        nbytes = n * width
        head = REPLY.pack(REPLY_MAGIC, 0, req.request_id, plan.epoch, plan.applied_step, dim, plan.dtype, nbytes)
        total = REPLY.size + nbytes
        assert self.transport is not None
        if (
            self._reply.size < total
            or self._reply.size > 4 * max(total, 1 << 20)  # grow, or shrink back
            or self.transport.get_write_buffer_size()  # the last reply is not all out (a pipelining client)
        ):
            self._reply = np.empty(total, dtype=np.uint8)
        buf = self._reply  # (48 + nbytes,) uint8: header then rows, sent as one
        raw = buf.data  # memoryview of the buffer
        raw[: REPLY.size] = head
        engine = self.rules.engine
        engine.lookups += 1
        engine.rows_served += n
        if req.step:
            engine.max_staleness_seen = max(engine.max_staleness_seen, max(0, req.step - 1 - plan.applied_step))
        body = buf[REPLY.size : total]  # (nbytes,)
        if nbytes <= INLINE_BYTES or n <= INLINE_LOOKUP_ROWS:
            src_rows = plan.src_rows  # (R,) opaque rows: one memcpy a row, no torch calls
            if src_rows is not None and n:
                src_rows.take(plan.pos, out=body.view(src_rows.dtype), mode="clip")  # ids checked: no buffering
            elif n:
                gather_into(plan.src, torch.from_numpy(plan.pos), _rows_view(body, plan.dtype, n=n, dim=dim))
            self._write(raw[:total])
            return
        self._state = _BUSY
        self.transport.pause_reading()
        self._big = asyncio.get_running_loop().create_task(self._chunked(plan, raw=raw, body=body, width=width))
        self._big.add_done_callback(self._big_done)

    async def _chunked(self, plan: LookupPlan, *, raw: memoryview, body: np.ndarray, width: int) -> None:
        """A large reply, chunk by chunk, each chunk written as soon as it is gathered: whole rows of
        the wire dtype gathered here on the loop (a chunk's take costs less than a thread hop), rows
        to convert in the worker pool. While the kernel sends a chunk the next is gathered; a chunk
        waits while more than a chunk is unsent (the loop then serves other connections)."""
        n = plan.pos.shape[0]
        loop = asyncio.get_running_loop()
        step = max(1, self.rules.chunk_bytes // width)
        src_rows = plan.src_rows
        if src_rows is not None:
            out_rows = body.view(src_rows.dtype)  # (n,) opaque rows
        else:
            out = _rows_view(body, plan.dtype, n=n, dim=plan.dim)  # (n, D), fp8: (n, D + D/32)
            idx = torch.from_numpy(plan.pos)
        pool = self.rules.engine.pool
        sent = 0
        for a in range(0, n, step):
            b = min(n, a + step)
            if src_rows is not None:
                src_rows.take(plan.pos[a:b], out=out_rows[a:b], mode="clip")  # ids checked: no buffering
            else:
                await loop.run_in_executor(pool, gather_into, plan.src, idx[a:b], out[a:b])
            end = REPLY.size + b * width
            self._write(raw[sent:end])
            sent = end
            await self._drained(self.rules.chunk_bytes)

    async def _drained(self, limit: int) -> None:
        """Wait until at most `limit` reply bytes are unsent (or the connection is gone)."""
        t = self.transport
        while t is not None and not t.is_closing() and t.get_write_buffer_size() > limit:
            self._drain = asyncio.get_running_loop().create_future()
            t.set_write_buffer_limits(high=limit, low=limit)
            try:
                await self._drain
            finally:
                self._drain = None
                t.set_write_buffer_limits(high=WRITE_HIGH)

    def _big_done(self, task: asyncio.Task) -> None:
        self._big = None
        if task.cancelled() or self._state == _CLOSING:
            return
        exc = task.exception()
        if exc is not None:
            log.error("data plane: a large reply failed", exc_info=exc)
            self._fail("the shard's data plane failed; see its log")
            return
        self._expect(_HEAD, memoryview(self.head))
        if self._eof:
            assert self.transport is not None
            self.transport.close()
        elif not self._writing and self.transport is not None:
            self.transport.resume_reading()

    # --- writing -----------------------------------------------------------------------------

    def _write(self, data: bytes | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close_with(self, code: Code, message: str, *, request_id: int = 0) -> None:
        """An error frame, then close once it is sent: the stream cannot be trusted any more."""
        self._write(self.rules.error_frame(code, message, request_id=request_id))
        self._state = _CLOSING
        if self.transport is not None:
            self.transport.close()

    def _fail(self, message: str) -> None:
        with contextlib.suppress(Exception):
            self._write(self.rules.error_frame(Code.INTERNAL, message, reason=Reason.INTERNAL))
        self._state = _CLOSING
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _rows_view(body: np.ndarray, dtype: int, *, n: int, dim: int) -> torch.Tensor:
    """(n * row_bytes,) uint8 -> (n, D) tensor in the wire dtype on the same memory (fp8: (n, D + D/32))."""
    return torch.from_numpy(body).view(ROW_DTYPES[dtype]).view(n, row_cols(dtype, dim))
