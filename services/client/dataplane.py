"""The client's side of the TCP row data plane (frames: services/frames.py).

A pool of connections per shard data address; one request at a time on a connection. Each
connection is an asyncio `BufferedProtocol`: the kernel copies the reply's 48-byte header and
then its rows straight into the (n, D) output tensor (`get_buffer` hands out the part still
to fill), and the header is checked in the read callback the moment it is complete, so a reply
costs one wake-up of the waiting task however many reads it takes. A connection that saw
anything unexpected (a malformed reply, bytes nobody asked for, a cancelled or timed-out
call) is closed, never reused.
"""

from __future__ import annotations

import asyncio
import itertools
import socket

import numpy as np
import torch

from services.client.errors import Code, ShardError
from services.frames import CODE_OF, MAX_ERROR_BYTES, REPLY, REPLY_MAGIC, Reply, Request
from services.wire import ROW_DTYPES, row_bytes, row_cols

SOCK_BUF = 4 << 20
MAX_IDLE = 8  # idle connections kept per shard
INLINE_IDS = 8192  # up to this many ids go out in one write with the header (one copy of 64 KiB at most)


class DataPlaneDown(Exception):
    """The data plane cannot be reached or broke mid-call (the caller may take the gRPC path)."""


class _Conn(asyncio.BufferedProtocol):
    """One connection: receives one reply at a time into the buffers `expect` names."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = bytearray(REPLY.size)
        self.reply: Reply | None = None
        self.error_body: bytearray | None = None
        self.lost: BaseException | None = None
        self._buf: memoryview | None = None  # what the next bytes fill
        self._got = 0
        self._in_head = False
        self._want: tuple[int, int, int, int] = (0, 0, 0, 0)  # request id, dtype, dim, body bytes
        self._rows: memoryview | None = None
        self._done: asyncio.Future[None] | None = None
        self._junk = bytearray(256)

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("the shard closed the connection")
        self._finish(self.lost)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._buf is None:
            return memoryview(self._junk)  # bytes nobody asked for: buffer_updated fails the connection
        return self._buf[self._got :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._buf is None:
            self._fail(DataPlaneDown("the shard sent bytes that answer no request: out of sync"))
            return
        self._got += nbytes
        if self._got < len(self._buf):
            return
        if self._in_head:
            self._header()
        else:
            self._finish(None)

    def eof_received(self) -> bool:
        return False  # close; connection_lost reports it

    # -- one reply ----------------------------------------------------------------------------

    def expect(self, *, request_id: int, dtype: int, dim: int, rows: memoryview) -> asyncio.Future[None]:
        """Receive the reply to `request_id`: rows (a good reply) land in `rows`."""
        if self.lost is not None:
            raise ConnectionResetError(f"the connection is gone: {self.lost}")
        self.reply, self.error_body, self._rows = None, None, rows
        self._want = (request_id, dtype, dim, len(rows))
        self._in_head, self._got, self._buf = True, 0, memoryview(self.head)
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    def _header(self) -> None:
        reply = self.reply = Reply.unpack(self.head)
        rid, dtype, dim, nbytes = self._want
        if reply.magic != REPLY_MAGIC or reply.request_id != rid:
            self._fail(DataPlaneDown(f"reply {reply.request_id} magic {reply.magic:#x} to request {rid}: out of sync"))
            return
        self._in_head, self._got = False, 0
        if reply.status:
            if reply.body_len > MAX_ERROR_BYTES:
                self._fail(DataPlaneDown(f"{reply.body_len}-byte error message"))
                return
            self.error_body = bytearray(reply.body_len)
            self._buf = memoryview(self.error_body)
        elif reply.dtype != dtype or reply.dim != dim or reply.body_len != nbytes:
            self._fail(DataPlaneDown(f"malformed reply: {reply.body_len} bytes, dim {reply.dim}, dtype {reply.dtype} "
                                     f"for {nbytes} bytes of {dim}-dim rows in dtype {dtype}"))
            return
        else:
            self._buf = self._rows
        if not len(self._buf):
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        self._buf, self._rows = None, None
        done, self._done = self._done, None
        if done is not None and not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        self._finish(exc)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class DataPlaneClient:
    def __init__(self, address: str, *, shard_id: int | None = None, shard_address: str = "") -> None:
        host, _, port = address.rpartition(":")
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
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
                await loop.sock_connect(sock, addr)
                _, conn = await loop.create_connection(_Conn, sock=sock)
                return conn
            except OSError as exc:
                sock.close()
                last = exc
        raise DataPlaneDown(f"cannot connect to the data plane at {self.address}: {last}")

    def _error(self, code: Code, message: str) -> ShardError:
        return ShardError(code, message, address=self.shard_address, shard_id=self.shard_id,
                          call=f"Lookup (data plane at {self.address})")

    async def lookup(
        self, *, table: int, ids: np.ndarray, dtype: int, dim: int, epoch: int, step: int = 0, max_staleness: int = 0
    ) -> tuple[torch.Tensor, int]:
        """(n,) int64 ids -> ((n, D) rows in `dtype` (fp8: (n, D + D/32) bytes), the shard's applied step). Raises ShardError
        for an error frame, DataPlaneDown when the connection fails."""
        conn = None
        while self._idle and conn is None:
            conn = self._idle.pop()
            if conn.lost is not None:  # the shard closed it while it was idle (e.g. its idle timeout)
                conn = None
        if conn is None:
            conn = await self._connect()
        ok = False
        try:
            out = await self._request(conn, table=table, ids=ids, dtype=dtype, dim=dim, epoch=epoch, step=step,
                                      max_staleness=max_staleness)
            ok = True
            return out
        except ShardError:
            ok = True  # an error frame: the connection is in sync and stays usable
            raise
        except (DataPlaneDown, ConnectionError, OSError) as exc:
            raise DataPlaneDown(f"data plane at {self.address}: {exc}") from None
        finally:
            if ok and conn.lost is None and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
            else:
                conn.close()

    async def _request(self, conn: _Conn, *, table, ids, dtype, dim, epoch, step, max_staleness):
        rid = next(self._ids)
        n = int(ids.size)
        head = Request(request_id=rid, table=table, dtype=dtype, epoch=epoch, step=step, max_staleness=max_staleness,
                       n_ids=n, body_len=8 * n).pack()
        ids = np.ascontiguousarray(ids, dtype="<i8")
        if dtype not in ROW_DTYPES:
            raise DataPlaneDown(f"dtype {dtype} is not a wire dtype")
        out = torch.empty((n, row_cols(dtype, dim)), dtype=ROW_DTYPES[dtype])  # (n, D), fp8 (n, D + D/32): rows land here
        rows = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        assert len(rows) == n * row_bytes(dtype, dim)
        done = conn.expect(request_id=rid, dtype=dtype, dim=dim, rows=rows)
        assert conn.transport is not None
        if n <= INLINE_IDS:
            conn.transport.write(head + ids.tobytes())
        else:
            conn.transport.writelines([head, memoryview(ids).cast("B")])
        await done
        reply = conn.reply
        assert reply is not None
        if reply.status:
            body = bytes(conn.error_body or b"")
            raise self._error(CODE_OF.get(reply.status, Code.UNKNOWN), body.decode("utf-8", "replace"))
        return out, reply.applied_step

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
