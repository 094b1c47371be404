"""The shard's TCP row data plane: lookups as length-prefixed frames (services/frames.py).

Runs on the shard's event loop next to gRPC. Per connection one request at a time: the 64-byte
header is read into a fixed buffer and checked field by field, the reply size is computed
from it and checked against the limit before anything else, the ids land in a per-connection
buffer, the request is validated like a gRPC Lookup (`ShardStore.plan_lookup`: epoch, table,
dtype, range, ownership, staleness), and the rows are gathered into a per-connection reply
buffer. Large replies are gathered in chunks in the worker pool, each sent while the next is
gathered, so the gather overlaps the send.

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
import socket
import ssl as ssl_module

import numpy as np
import torch

from services.errors import Reason
from services.frames import KIND_LOOKUP, REPLY, REPLY_MAGIC, REQUEST, REQUEST_MAGIC, VERSION, Request, error_reply
from services.security.roles import allows
from services.security.tls import ServerSSL, peer_role
from services.security.tlsio import PlainIO, TlsIO
from services.shard.engine import INLINE_LOOKUP_ROWS, ShardEngine
from services.shard.errors import Code, ShardError
from services.shard.gather import gather_into
from services.shard.store_types import LookupPlan
from services.wire import ROW_DTYPES, row_bytes, row_cols

log = logging.getLogger("engram.shard")
SOCK_BUF = 4 << 20
CHUNK_BYTES = 2 << 20  # reply bytes per gather step of a large reply
INLINE_BYTES = 256 << 10  # smaller replies are gathered on the loop (no thread hop)
HANDSHAKE_S = 10.0  # a TLS handshake that takes longer costs only its connection
FAIR_EVERY = 16  # requests served back to back on one connection before yielding to the loop


FRAME_REASONS = {  # what an error frame's code means when the frame itself was refused (services/errors.py)
    Code.INVALID_ARGUMENT: Reason.BAD_REQUEST,
    Code.UNIMPLEMENTED: Reason.BAD_REQUEST,
    Code.RESOURCE_EXHAUSTED: Reason.REPLY_TOO_LARGE,
    Code.PERMISSION_DENIED: Reason.PERMISSION_DENIED,
    Code.INTERNAL: Reason.INTERNAL,
}


class Disconnected(Exception):
    pass


class DataPlane:
    def __init__(
        self,
        engine: ShardEngine,
        *,
        max_reply_bytes: int,
        chunk_bytes: int = CHUNK_BYTES,
        ssl: ServerSSL | None = None,
        need_role: str | None = None,
    ) -> None:
        self.engine = engine
        self.ssl = ssl
        self.need_role = need_role  # with TLS: the role a client certificate needs
        self.max_reply_bytes = max_reply_bytes
        self.max_request_bytes = max_reply_bytes  # ids: 8 bytes a row, never more than the rows' reply
        self.chunk_bytes = chunk_bytes
        self.port = 0
        self._listener: socket.socket | None = None
        self._accept: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self.errors_sent = 0

    async def start(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listener = sock
        self.port = sock.getsockname()[1]
        self._accept = asyncio.create_task(self._accept_loop(sock))
        return self.port

    async def stop(self) -> None:
        if self._accept is not None:
            self._accept.cancel()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, *([self._accept] if self._accept else []), return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: keep serving the connections there are
                log.warning("data plane: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            task = asyncio.create_task(self._serve(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    # ---------------------------------------------------------------------------------------

    async def _secure(self, sock: socket.socket) -> _Connection | None:
        """The connection's byte stream: TLS handshake and role check when TLS is on -> None: refused."""
        if self.ssl is None:
            return _Connection(sock, PlainIO(sock))
        io = TlsIO(sock, self.ssl.current(), server_side=True)
        try:
            await asyncio.wait_for(io.handshake(), HANDSHAKE_S)
        except (OSError, TimeoutError, ssl_module.SSLError) as exc:
            log.info("data plane: TLS handshake refused: %s", exc)
            return None
        conn = _Connection(sock, io)
        if self.need_role is not None:
            role = peer_role(io.peercert())
            if not allows(role, self.need_role):
                why = f"this caller has '{role}'" if role else "the client certificate carries no engram role"
                await self._error(
                    conn, Code.PERMISSION_DENIED, f"the data plane needs the '{self.need_role}' role; {why}"
                )
                with contextlib.suppress(OSError, TimeoutError):  # read the request: close with FIN, not RST
                    await asyncio.wait_for(io.recv_into(memoryview(conn.head)), 1.0)
                return None
        return conn

    async def _serve(self, sock: socket.socket) -> None:
        try:
            conn = await self._secure(sock)
        except BaseException:
            sock.close()
            raise
        if conn is None:
            sock.close()
            return
        try:
            served = 0
            while await self._one(conn):
                served += 1
                if served % FAIR_EVERY == 0:  # reads take what is already there: let the loop's other work in
                    await asyncio.sleep(0)
        except Disconnected:
            pass
        except (ConnectionError, OSError) as exc:  # the client went away mid-reply
            log.debug("data plane: connection lost: %s", exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("data plane: connection handler failed")
            with contextlib.suppress(Exception):
                await conn.send(
                    error_reply(Code.INTERNAL, "the shard's data plane failed; see its log", reason=Reason.INTERNAL)
                )
        finally:
            sock.close()

    async def _error(
        self, conn: _Connection, code: Code, message: str, *, request_id: int = 0, reason: Reason | str | None = None
    ) -> None:
        """An error frame; the reason defaults to what the code means on this plane (a malformed frame,
        a reply over the limit, the role check, a bug)."""
        self.errors_sent += 1
        await conn.send(error_reply(code, message, request_id, reason=reason or FRAME_REASONS.get(code)))

    async def _one(self, conn: _Connection) -> bool:
        """Serve one request -> keep the connection?"""
        got = await conn.recv_into(conn.head, REQUEST.size)
        if got == 0:
            return False
        if got < REQUEST.size:
            await self._error(
                conn,
                Code.INVALID_ARGUMENT,
                f"truncated frame: the connection ended after {got} of {REQUEST.size} header bytes",
            )
            return False
        req = Request.unpack(conn.head)
        rid = req.request_id
        if req.magic != REQUEST_MAGIC or req.version != VERSION:
            await self._error(
                conn,
                Code.INVALID_ARGUMENT,
                f"bad frame: magic {req.magic:#x} version {req.version} "
                f"(expected {REQUEST_MAGIC:#x} version {VERSION}); closing",
                request_id=rid,
            )
            return False
        problem = self._check_header(req)
        if problem is not None:
            code, message = problem
            if req.body_len > self.max_request_bytes:
                await self._error(conn, code, message + "; the body is too large to skip, closing", request_id=rid)
                return False
            if await conn.drain(req.body_len) < req.body_len:
                return False
            await self._error(conn, code, message, request_id=rid)
            return True
        ids = conn.ids_buffer(req.n_ids)
        got = await conn.recv_into(ids.view(np.uint8), req.body_len)
        if got < req.body_len:
            await self._error(
                conn,
                Code.INVALID_ARGUMENT,
                f"truncated frame: the connection ended after {got} of {req.body_len} id bytes",
                request_id=rid,
            )
            return False
        try:
            plan = self.engine.store.plan_lookup(
                table=req.table,
                epoch=req.epoch,
                ids=ids,
                dtype=req.dtype,
                step=req.step,
                max_staleness=req.max_staleness,
            )
        except ShardError as exc:
            await self._error(conn, exc.code, exc.message, request_id=rid, reason=exc.reason)
            return True
        await self._reply(conn, req, plan)
        return True

    def _check_header(self, req: Request) -> tuple[Code, str] | None:
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

    async def _reply(self, conn: _Connection, req: Request, plan: LookupPlan) -> None:
        n, dim = plan.pos.shape[0], plan.dim
        width = row_bytes(plan.dtype, dim)
        nbytes = n * width
        head = REPLY.pack(REPLY_MAGIC, 0, req.request_id, plan.epoch, plan.applied_step, dim, plan.dtype, nbytes)
        buf = conn.reply_buffer(REPLY.size + nbytes)  # (48 + nbytes,) uint8: header then rows, sent as one
        raw = buf.data  # memoryview of the (48 + nbytes,) uint8 buffer
        raw[: REPLY.size] = head
        engine = self.engine
        engine.lookups += 1
        engine.rows_served += n
        if req.step:
            engine.max_staleness_seen = max(engine.max_staleness_seen, max(0, req.step - 1 - plan.applied_step))
        body = buf[REPLY.size : REPLY.size + nbytes]  # (nbytes,)
        if nbytes <= INLINE_BYTES or n <= INLINE_LOOKUP_ROWS:
            src_rows = whole_rows(plan.src, plan.dtype)  # (R,) opaque rows: one memcpy a row, no torch calls
            if src_rows is not None and n:
                src_rows.take(plan.pos, out=body.view(src_rows.dtype), mode="clip")  # ids checked: no buffering
            elif n:
                gather_into(plan.src, torch.from_numpy(plan.pos), _rows_view(body, plan.dtype, n=n, dim=dim))
            await conn.send(raw[: REPLY.size + nbytes])
            return
        out = _rows_view(body, plan.dtype, n=n, dim=dim)  # (n, D), fp8: (n, D + D/32)
        idx = torch.from_numpy(plan.pos)
        loop = asyncio.get_running_loop()
        step = max(1, self.chunk_bytes // width)
        sent = 0
        pending_send: asyncio.Future | None = None
        try:
            for a in range(0, n, step):
                b = min(n, a + step)
                gathered = loop.run_in_executor(engine.pool, gather_into, plan.src, idx[a:b], out[a:b])
                try:
                    if pending_send is not None:
                        await pending_send  # the previous chunk goes out while this one is gathered
                finally:
                    await gathered
                end = REPLY.size + b * width
                pending_send = asyncio.ensure_future(conn.send(raw[sent:end]))
                sent = end
            assert pending_send is not None
            await pending_send
        finally:
            if pending_send is not None and not pending_send.done():
                pending_send.cancel()
                with contextlib.suppress(BaseException):
                    await pending_send


def whole_rows(src: torch.Tensor, dtype: int) -> np.ndarray | None:
    """src (R, D) already in the wire dtype -> (R,) numpy opaque rows on its memory; None: rows need converting."""
    if ROW_DTYPES[dtype] != src.dtype:
        return None
    raw = src.view(torch.uint8).numpy()  # (R, D * itemsize)
    return raw.view(np.dtype((np.void, raw.shape[1]))).reshape(src.shape[0])


def _rows_view(body: np.ndarray, dtype: int, *, n: int, dim: int) -> torch.Tensor:
    """(n * row_bytes,) uint8 -> (n, D) tensor in the wire dtype on the same memory (fp8: (n, D + D/32))."""
    return torch.from_numpy(body).view(ROW_DTYPES[dtype]).view(n, row_cols(dtype, dim))


class _Connection:
    """One client connection and its reusable buffers."""

    def __init__(self, sock: socket.socket, io: PlainIO | TlsIO) -> None:
        self.sock = sock
        self.io = io
        self.head = bytearray(REQUEST.size)
        self._ids = np.empty(0, dtype="<i8")
        self._reply = np.empty(0, dtype=np.uint8)
        self._scratch = bytearray(64 << 10)

    def ids_buffer(self, n: int) -> np.ndarray:
        if self._ids.size < n:
            self._ids = np.empty(n, dtype="<i8")
        return self._ids[:n]

    def reply_buffer(self, nbytes: int) -> np.ndarray:
        if self._reply.size < nbytes or self._reply.size > 4 * max(nbytes, 1 << 20):  # grow, or shrink back
            self._reply = np.empty(nbytes, dtype=np.uint8)
        return self._reply

    async def recv_into(self, buf, nbytes: int) -> int:
        """Fill buf[:nbytes] -> bytes received (fewer only if the peer closed)."""
        view = memoryview(buf).cast("B")[:nbytes]
        got = 0
        while got < nbytes:
            k = await self.io.recv_into(view[got:])
            if k == 0:
                break
            got += k
        return got

    async def drain(self, nbytes: int) -> int:
        got = 0
        while got < nbytes:
            k = await self.io.recv_into(memoryview(self._scratch)[: min(len(self._scratch), nbytes - got)])
            if k == 0:
                break
            got += k
        return got

    async def send(self, data) -> None:
        await self.io.sendall(data)
