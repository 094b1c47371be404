"""The client's side of the TCP row data plane (frames: services/frames.py).

A pool of connections per shard data address; one request at a time on a connection. Each
connection is an asyncio `BufferedProtocol`: the event loop reads the reply header into a
fixed buffer and the rows straight into the (n, D) output tensor (copied once, by the
kernel), and the request's future is resolved from the loop's read callback. `issue()`
writes a request on an idle connection at once and returns that future (no task, no loop
round before the bytes leave: a 1K-row lookup's whole budget is a few hundred
microseconds); `lookup()` is the awaitable form that connects when no connection is idle.

A connection that saw anything unexpected (a malformed reply, bytes nobody asked for, a
cancelled call) is closed, never reused; one the shard closed while idle is dropped by the
loop's callback, without a system call per request. With an `ssl` context every connection
is TLS (asyncio's TLS transport), the client certificate giving the role.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl

import numpy as np
import torch

from services.client.errors import Code, ShardError
from services.client.row_request import RowRequest
from services.errors import Reason
from services.frames import (
    CODE_OF,
    KIND_LOOKUP,
    MAX_ERROR_BYTES,
    REPLY,
    REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    VERSION,
    reason_of_number,
)
from services.wire import ROW_DTYPES, row_bytes, row_cols

SOCK_BUF = 4 << 20
MAX_IDLE = 8  # idle connections kept per shard
SMALL_IDS = 8192  # up to this many ids the header and ids leave as one write (one segment)
RCV_LOWAT = 256 << 10  # a large plaintext reply wakes the loop per this many bytes (SO_RCVLOWAT), not per segment
Rows = tuple[torch.Tensor, int]  # ((n, D) rows in the wire dtype, the shard's applied step)

_HEAD, _BODY, _ERROR, _IDLE = range(4)  # what the bytes arriving on a connection are


class DataPlaneDown(Exception):
    """The data plane cannot be reached or broke mid-call (the caller may take the gRPC path)."""


class _Conn(asyncio.BufferedProtocol):
    """One connection: at most one request in flight, its reply read in place."""

    def __init__(self, owner: DataPlaneClient) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.lost: str | None = None  # why this connection can't be used (closed, out of sync); None: usable
        self.head = bytearray(REPLY.size)
        self._scratch = bytearray(4096)  # bytes nobody asked for land here before the connection is dropped
        self._state = _HEAD  # a new connection may be answered before it asks: a refusal (no read role)
        self._view: memoryview = memoryview(self.head)
        self._got = 0
        self._future: asyncio.Future[Rows] | None = None
        self._want: tuple[int, int, int, int] = (0, 0, 0, 0)  # (request id, n, dtype, dim)
        self._rows: torch.Tensor | None = None
        self._applied = 0
        self._status = (0, 0, False)  # an error frame's (status, reason number, the shard closes after it)
        self.refusal: ShardError | None = None  # the error frame that refused this connection at connect
        self.reused = False  # has served a request before (a failure before any reply byte may be a stale close)
        self.replied = False  # bytes of the current reply arrived
        self._sock: socket.socket | None = None  # plaintext connections: the socket, for SO_RCVLOWAT
        self._lowat = 1  # the socket's SO_RCVLOWAT now

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.owner.ssl_context is None:  # (TLS: the socket's bytes are not the reply's bytes)
            self._sock = transport.get_extra_info("socket")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = f"broken: {exc}" if exc else "closed by the shard"
        if self._future is not None and not self._future.done():
            got, n = self._got, len(self._view)
            where = "before its reply" if not self.replied else f"after {got} of {n} bytes"
            self._future.set_exception(ConnectionResetError(f"the shard closed the connection {where}"))
        self._future = None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state == _IDLE:
            return memoryview(self._scratch)
        return self._view[self._got :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._state == _IDLE:
            self._drop("bytes that answer no request")
            return
        self.replied = True
        self._got += nbytes
        if self._got < len(self._view):
            if self._got + self._lowat > len(self._view):
                self._set_lowat(len(self._view) - self._got)  # never wait for more than is still to come
            return
        try:
            if self._state == _HEAD:
                self._on_head()
            elif self._state == _BODY:
                assert self._rows is not None
                self._finish(result=(self._rows, self._applied))
            else:
                self._on_error_body()
        except DataPlaneDown as exc:
            self._finish(error=exc, drop=str(exc))

    # --- one request -------------------------------------------------------------------------

    def request(self, head: bytes, ids: np.ndarray, *, want: tuple[int, int, int, int]) -> asyncio.Future[Rows]:
        """Write the request now -> its future ((n, D) rows, applied step)."""
        fut: asyncio.Future[Rows] = asyncio.get_running_loop().create_future()
        if self.lost is not None or self.transport is None:
            fut.set_exception(self.refusal or ConnectionResetError(f"the connection is unusable: {self.lost}"))
            return fut
        self._future = fut
        self._want, self._rows, self.replied = want, None, self._got > 0
        if self._state == _IDLE:
            self._expect(_HEAD, memoryview(self.head))  # (a new connection is already there, maybe part-way)
        if want[1] <= SMALL_IDS:
            self.transport.write(head + ids.tobytes())  # one send: header and ids in one segment
        else:
            self.transport.write(head)
            self.transport.write(ids.tobytes())  # (the transport may keep it queued: its own copy)
        fut.add_done_callback(self._on_done)
        return fut

    def _expect(self, state: int, view: memoryview) -> None:
        self._state, self._view, self._got = state, view, 0

    def _on_head(self) -> None:
        owner = self.owner
        rid, n, dtype, dim = self._want
        magic, status, reply_id, _, applied_step, reply_dim, reply_dtype, body_len = REPLY.unpack(self.head)
        connection_error = reply_id == 0 and status  # e.g. refused at connect (no read role)
        if magic != REPLY_MAGIC or (reply_id != rid and not connection_error):
            raise DataPlaneDown(
                f"data plane at {owner.address}: reply {reply_id} magic {magic:#x} to request {rid}: out of sync"
            )
        if status:
            if body_len > MAX_ERROR_BYTES:
                raise DataPlaneDown(f"data plane at {owner.address}: {body_len}-byte error message")
            self._status = (status, reply_dim, bool(connection_error))
            self._expect(_ERROR, memoryview(bytearray(body_len)))
            if not body_len:
                self._on_error_body()
            return
        nbytes = n * row_bytes(dtype, dim)
        if reply_dtype != dtype or reply_dim != dim or body_len != nbytes:
            raise DataPlaneDown(
                f"data plane at {owner.address}: malformed reply: {body_len} bytes, dim "
                f"{reply_dim}, dtype {reply_dtype} for {n} rows of {dim} dims in dtype {dtype}"
            )
        self._applied = applied_step
        self._rows = torch.empty((n, row_cols(dtype, dim)), dtype=ROW_DTYPES[dtype])  # (n, D), fp8 (n, D + D/32)
        if not nbytes:
            self._finish(result=(self._rows, applied_step))
            return
        self._expect(_BODY, self._rows.view(torch.uint8).numpy().data.cast("B"))
        if nbytes > RCV_LOWAT:
            self._set_lowat(RCV_LOWAT)

    def _set_lowat(self, nbytes: int) -> None:
        """Wake this connection's reads only once `nbytes` have arrived (a shard closing or failing
        still wakes it at once): a large reply costs ~8x fewer wake-ups, on both ends. Plaintext only,
        and never more than the reply still owes."""
        if self._sock is not None and nbytes != self._lowat:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
                self._lowat = nbytes
            except OSError:
                self._sock = None  # (not a TCP socket after all): read per segment

    def _on_error_body(self) -> None:
        status, reason, closing = self._status
        err = self.owner.error(
            CODE_OF.get(status, Code.UNKNOWN),
            bytes(self._view).decode("utf-8", "replace"),
            reason=reason_of_number(reason),
        )
        err.connection_closed = closing  # type: ignore[attr-defined]  # the shard closes it
        if closing:
            self.refusal = err
        self._finish(error=err, drop="refused by the shard" if closing else None)

    def _finish(self, *, result: Rows | None = None, error: Exception | None = None, drop: str | None = None) -> None:
        """The reply is complete (or broken): back to the pool when in sync, then resolve the future."""
        fut, self._future = self._future, None
        self._expect(_IDLE, memoryview(self.head))
        self._rows = None
        self._set_lowat(1)  # (a no-op unless a large reply raised it)
        if drop is not None:
            self._drop(drop)
        else:
            self.reused = True
            self.owner.release(self)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def _on_done(self, fut: asyncio.Future[Rows]) -> None:
        if fut.cancelled() and fut is self._future:  # its reply is still to come: the stream is out of step
            self._future = None
            self._drop("a cancelled call left its reply unread")

    def _drop(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        if self.transport is not None:
            self.transport.abort()
        if self._future is not None and not self._future.done():
            self._future.set_exception(DataPlaneDown(f"data plane at {self.owner.address}: {why}"))


class DataPlaneClient:
    def __init__(
        self,
        address: str,
        *,
        shard_id: int | None = None,
        shard_address: str = "",
        ssl_context: ssl.SSLContext | None = None,
        server_name: str = "",
    ) -> None:
        host, _, port = address.rpartition(":")
        self.ssl_context, self.server_name = ssl_context, server_name
        self.address = address
        self.shard_address = shard_address or address  # the shard's gRPC address: its name in errors
        self.host, self.port = host.strip("[]"), int(port)
        self.shard_id = shard_id
        self._idle: list[_Conn] = []
        self._ids = itertools.count(1)

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)  # before connect: the window scale
                await loop.sock_connect(sock, addr)
                if self.ssl_context is None:
                    _, conn = await loop.create_connection(lambda: _Conn(self), sock=sock)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self),
                        sock=sock,
                        ssl=self.ssl_context,
                        server_hostname=self.server_name or self.host,
                    )
                return conn
            except ssl.SSLError as exc:
                sock.close()
                raise DataPlaneDown(f"TLS to the data plane at {self.address} failed: {exc}") from None
            except OSError as exc:
                sock.close()
                last = exc
        raise DataPlaneDown(f"cannot connect to the data plane at {self.address}: {last}")

    def _take_idle(self) -> _Conn | None:
        """An idle connection the shard has not closed meanwhile (the loop reported it), else None."""
        while self._idle:
            conn = self._idle.pop()
            if conn.lost is None:
                return conn
        return None

    def release(self, conn: _Conn) -> None:
        if conn.lost is None and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        elif conn.lost is None and conn.transport is not None:
            conn.lost = "more idle connections than kept"
            conn.transport.close()

    def error(self, code: Code, message: str, *, reason: Reason | None = None) -> ShardError:
        return ShardError(
            code,
            message,
            reason=reason,
            address=self.shard_address,
            shard_id=self.shard_id,
            call=f"Lookup (data plane at {self.address})",
        )

    def _send(self, conn: _Conn, req: RowRequest) -> asyncio.Future[Rows]:
        rid = next(self._ids)
        n = int(req.ids.size)
        head = REQUEST.pack(
            REQUEST_MAGIC, VERSION, KIND_LOOKUP, rid, req.table, req.dtype, req.epoch, req.step, req.max_staleness,
            0, n, 8 * n,
        )  # fmt: skip
        ids = np.ascontiguousarray(req.ids, dtype="<i8")
        return conn.request(head, ids, want=(rid, n, req.dtype, req.dim))

    def issue(self, req: RowRequest) -> asyncio.Future[Rows] | None:
        """Write the lookup now on an idle connection -> its future, or None when none is idle (then
        `await lookup(...)`). The future raises ShardError (an error frame) or ConnectionError /
        DataPlaneDown (the connection broke); cancelling it drops the connection."""
        conn = self._take_idle()
        if conn is None:
            return None
        return self._send(conn, req)

    async def lookup(self, req: RowRequest) -> Rows:
        """-> ((n, D) rows in the request's dtype (fp8: (n, D + D/32) bytes), the shard's applied step).
        Raises ShardError for an error frame, DataPlaneDown when the connection fails.

        A reused connection that breaks before any byte of its reply (the shard closed it while it
        was idle, and the close crossed the request) is replaced once: a lookup only reads."""
        for attempt in range(2):
            conn = self._take_idle() or await self._connect()
            fut = self._send(conn, req)
            try:
                return await fut
            except (ConnectionError, OSError) as exc:
                if attempt == 0 and conn.reused and not conn.replied:
                    continue
                raise DataPlaneDown(f"data plane at {self.address}: {exc}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._idle:
            conn.lost = "closed by the client"
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
