"""The shard's TCP row data plane: lookups as length-prefixed frames (services/frames.py).

Runs on the shard's event loop next to gRPC. Each connection is an asyncio `BufferedProtocol`
(one request at a time): the kernel copies the 64-byte header into a fixed buffer, which is
checked field by field in the read callback, with the reply size computed from it and
checked against the limit before anything else; the ids land in a per-connection buffer; the
request is validated like a gRPC Lookup (`ShardStore.plan_lookup`: epoch, table, dtype,
range, ownership, staleness), and the rows are gathered into a per-connection reply buffer.
A small reply is gathered and handed to the transport inside that read callback: no task, no
wake-up. Large replies are gathered in chunks in the worker pool by a task, each chunk handed
to the transport (which sends it without a copy) while the next is gathered. Reading stays
paused while a reply is being gathered or is not yet sent, so the reply buffer is reused only
once the kernel has it.

Bad input gets an error frame with a gRPC status code and a message. After a bad header
field, a wrong length or an oversized request whose body can be skipped, and after any
lookup error, the connection stays usable; after a bad magic or version (the stream cannot
be trusted), a truncated frame or a request sent before the previous reply went out, the
shard answers and closes. A client that goes away mid-reply costs only its connection.
Lookups never write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import numpy as np
import torch

from services.frames import KIND_LOOKUP, REQUEST, REQUEST_MAGIC, VERSION, Reply, Request, error_reply
from services.shard.engine import INLINE_LOOKUP_ROWS, ShardEngine
from services.shard.errors import Code, ShardError
from services.shard.gather import gather_into
from services.wire import ROW_DTYPES, row_bytes, row_cols

log = logging.getLogger("engram.shard")
SOCK_BUF = 4 << 20
CHUNK_BYTES = 2 << 20  # reply bytes per gather step of a large reply
INLINE_BYTES = 256 << 10  # smaller replies are gathered on the loop (no thread hop)
HEAD, IDS, DRAIN, BUSY = range(4)  # what a connection's next bytes are


class DataPlane:
    def __init__(self, engine: ShardEngine, *, max_reply_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.engine = engine
        self.max_reply_bytes = max_reply_bytes
        self.max_request_bytes = max_reply_bytes  # ids: 8 bytes a row, never more than the rows' reply
        self.chunk_bytes = chunk_bytes
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Connection] = set()
        self.errors_sent = 0

    async def start(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
            sock.listen(128)
            sock.setblocking(False)
            self._server = await asyncio.get_running_loop().create_server(lambda: _Connection(self), sock=sock)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.abort()
            if conn.task is not None:
                conn.task.cancel()
        await asyncio.gather(*(c.task for c in conns if c.task is not None), return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):  # every connection was aborted: this is quick
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def check_header(self, req: Request) -> tuple[Code, str] | None:
        store = self.engine.store
        if req.kind != KIND_LOOKUP:
            return Code.UNIMPLEMENTED, f"kind: {req.kind} is not a request kind (1 = lookup)"
        if req.flags:
            return Code.INVALID_ARGUMENT, f"flags: {req.flags:#x}, no flags are defined"
        if req.body_len != 8 * req.n_ids:
            return Code.INVALID_ARGUMENT, (f"wrong length: body_len {req.body_len} bytes, but {req.n_ids} int64 ids "
                                           f"take {8 * req.n_ids}")
        if req.table not in store.layouts:
            return Code.INVALID_ARGUMENT, f"table {req.table}: no such Engram table (layers {sorted(store.layouts)})"
        if req.dtype not in ROW_DTYPES:
            return Code.INVALID_ARGUMENT, f"dtype: {req.dtype} is not a wire dtype (1 FP32, 2 BF16, 3 FP16, 4 FP8)"
        reply = req.n_ids * row_bytes(req.dtype, store.layouts[req.table].dim)
        if reply > self.max_reply_bytes:
            return Code.RESOURCE_EXHAUSTED, (f"oversized request: {req.n_ids} rows make a {reply}-byte reply, the "
                                             f"limit is {self.max_reply_bytes} (cluster.max_message_mb); split it")
        return None


class _Connection(asyncio.BufferedProtocol):
    """One client connection: its state machine and reusable buffers."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None  # a large reply being gathered
        self.head = bytearray(REQUEST.size)
        self._ids = np.empty(0, dtype="<i8")
        self._reply = torch.empty(0, dtype=torch.uint8)
        self._scratch = bytearray(64 << 10)
        self._state = HEAD
        self._buf = memoryview(self.head)  # what the next bytes fill (HEAD, IDS)
        self._got = 0
        self._req: Request | None = None
        self._drain_left = 0
        self._drain_error: tuple[Code, str, int] | None = None
        self._write_paused = self._read_paused = False

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.plane._conns.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        transport.set_write_buffer_limits(high=0)  # pause_writing whenever a reply is not fully sent yet

    def connection_lost(self, exc: Exception | None) -> None:
        self.plane._conns.discard(self)
        if exc is not None:
            log.debug("data plane: connection lost: %s", exc)
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pace()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pace()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == DRAIN:
            return memoryview(self._scratch)[: min(len(self._scratch), self._drain_left)]
        if self._state == BUSY:  # reading is paused; bytes that still come are a second request too early
            return memoryview(self._scratch)
        return self._buf[self._got :]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._state == DRAIN:
                self._drain_left -= nbytes
                if not self._drain_left:
                    assert self._drain_error is not None
                    self._error(*self._drain_error)
                    self._expect_head()
                return
            if self._state == BUSY:
                self._error(Code.INVALID_ARGUMENT, "a request arrived before the reply to the previous one was "
                            "sent (one request at a time per connection); closing", 0, close=True)
                return
            self._got += nbytes
            if self._got < len(self._buf):
                return
            if self._state == HEAD:
                self._on_head()
            else:
                self._on_ids()
        except Exception:
            log.exception("data plane: connection handler failed")
            self._error(Code.INTERNAL, "the shard's data plane failed; see its log", 0, close=True)

    def eof_received(self) -> bool:
        if self._state == HEAD and self._got:
            self._error(Code.INVALID_ARGUMENT, f"truncated frame: the connection ended after {self._got} of "
                        f"{REQUEST.size} header bytes", 0, close=True)
        elif self._state == IDS:
            assert self._req is not None
            self._error(Code.INVALID_ARGUMENT, f"truncated frame: the connection ended after {self._got} of "
                        f"{self._req.body_len} id bytes", self._req.request_id, close=True)
        return False  # the transport closes (after sending what it holds)

    # -- one request ----------------------------------------------------------------------------

    def _expect_head(self) -> None:
        self._state, self._buf, self._got, self._req = HEAD, memoryview(self.head), 0, None
        self._pace()

    def _pace(self) -> None:
        """Read only while no reply is being gathered or waits to be sent."""
        pause = self._write_paused or self._state == BUSY
        if pause != self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _error(self, code: Code, message: str, request_id: int, *, close: bool = False) -> None:
        self.plane.errors_sent += 1
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(error_reply(code, message, request_id))
        if close:
            self.transport.close()

    def _on_head(self) -> None:
        req = Request.unpack(self.head)
        rid = req.request_id
        if req.magic != REQUEST_MAGIC or req.version != VERSION:
            self._error(Code.INVALID_ARGUMENT, f"bad frame: magic {req.magic:#x} version {req.version} (expected "
                        f"{REQUEST_MAGIC:#x} version {VERSION}); closing", rid, close=True)
            return
        problem = self.plane.check_header(req)
        if problem is not None:
            code, message = problem
            if req.body_len > self.plane.max_request_bytes:
                self._error(code, message + "; the body is too large to skip, closing", rid, close=True)
            elif req.body_len:
                self._state, self._drain_left, self._drain_error = DRAIN, req.body_len, (code, message, rid)
            else:
                self._error(code, message, rid)
                self._expect_head()
            return
        self._req = req
        if self._ids.size < req.n_ids:
            self._ids = np.empty(req.n_ids, dtype="<i8")
        self._state, self._got = IDS, 0
        self._buf = memoryview(self._ids[: req.n_ids].view(np.uint8))
        if not req.body_len:
            self._on_ids()

    def _on_ids(self) -> None:
        req = self._req
        assert req is not None
        ids = self._ids[: req.n_ids]
        try:
            plan = self.plane.engine.store.plan_lookup(table=req.table, epoch=req.epoch, ids=ids, dtype=req.dtype,
                                                       step=req.step, max_staleness=req.max_staleness)
        except ShardError as exc:
            self._error(exc.code, exc.message, req.request_id)
            self._expect_head()
            return
        n, dim = plan.pos.shape[0], plan.dim
        width, cols = row_bytes(plan.dtype, dim), row_cols(plan.dtype, dim)
        nbytes = n * width
        head = Reply(status=0, request_id=req.request_id, epoch=plan.epoch, applied_step=plan.applied_step, dim=dim,
                     dtype=plan.dtype, body_len=nbytes).pack()
        if self._reply.numel() < len(head) + nbytes or self._reply.numel() > 4 * max(nbytes, 1 << 20):
            self._reply = torch.empty(len(head) + nbytes, dtype=torch.uint8)  # grow, or shrink back
        raw = memoryview(self._reply.numpy())  # (48 + nbytes,) bytes
        raw[: len(head)] = head
        out = self._reply[len(head) : len(head) + nbytes].view(ROW_DTYPES[plan.dtype]).view(n, cols)  # (n, D), fp8 (n, D + D/32)
        idx = torch.from_numpy(plan.pos)
        engine = self.plane.engine
        engine.lookups += 1
        engine.rows_served += n
        if req.step:
            engine.max_staleness_seen = max(engine.max_staleness_seen, max(0, req.step - 1 - plan.applied_step))
        assert self.transport is not None
        if nbytes <= INLINE_BYTES or n <= INLINE_LOOKUP_ROWS:
            gather_into(plan.src, idx, out)
            self.transport.write(raw[: len(head) + nbytes])
            self._expect_head()
            return
        self._state = BUSY
        self._pace()
        self.task = asyncio.get_running_loop().create_task(self._large(plan.src, idx, out, raw, len(head), width))

    async def _large(self, src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, raw: memoryview, head: int,
                     width: int) -> None:
        """Gather chunk k in the pool while the transport sends chunk k-1 (no copy: it keeps a view)."""
        loop = asyncio.get_running_loop()
        n = out.shape[0]
        step = max(1, self.plane.chunk_bytes // width)
        sent = 0
        try:
            for a in range(0, n, step):
                b = min(n, a + step)
                await loop.run_in_executor(self.plane.engine.pool, gather_into, src, idx[a:b], out[a:b])
                if self.transport is None or self.transport.is_closing():
                    return  # the client went away mid-reply: only its connection is lost
                end = head + b * width
                self.transport.write(raw[sent:end])
                sent = end
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("data plane: connection handler failed")
            self._error(Code.INTERNAL, "the shard's data plane failed; see its log", 0, close=True)
            return
        finally:
            self.task = None
        self._expect_head()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
