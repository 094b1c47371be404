"""The client's side of the TCP row data plane (frames: services/frames.py).

A pool of connections per shard data address; one request at a time on a connection. The
rows are received straight into the (n, D) output tensor (`recv_into`), so they are copied
once, by the kernel. A connection that saw anything unexpected (a malformed reply, a
cancelled or timed-out call) is closed, never reused. With an `ssl` context every
connection is TLS (services/security/tlsio.py), the client certificate giving the role.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import ssl

import numpy as np
import torch

from services.client.errors import Code, ShardError
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
from services.security.tlsio import PlainIO, TlsIO
from services.wire import ROW_DTYPES, row_bytes, row_cols

SOCK_BUF = 4 << 20
MAX_IDLE = 8  # idle connections kept per shard
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # once: enum flags cost microseconds to combine


class DataPlaneDown(Exception):
    """The data plane cannot be reached or broke mid-call (the caller may take the gRPC path)."""


class _Conn:
    def __init__(self, sock: socket.socket, io: PlainIO | TlsIO) -> None:
        self.sock = sock
        self.io = io
        self.head = bytearray(REPLY.size)

    @property
    def lost(self) -> str | None:
        """Why an idle connection can't be used (the shard closed it, or sent bytes nobody asked for); None: usable."""
        try:
            pending = self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return None
        except OSError as exc:
            return f"broken: {exc}"
        return "closed by the shard" if not pending else "bytes that answer no request"


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
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
                await loop.sock_connect(sock, addr)
                if self.ssl_context is None:
                    return _Conn(sock, PlainIO(sock))
                io = TlsIO(sock, self.ssl_context, server_side=False, server_hostname=self.server_name or self.host)
                await io.handshake()
                return _Conn(sock, io)
            except ssl.SSLError as exc:
                sock.close()
                raise DataPlaneDown(f"TLS to the data plane at {self.address} failed: {exc}") from None
            except OSError as exc:
                sock.close()
                last = exc
        raise DataPlaneDown(f"cannot connect to the data plane at {self.address}: {last}")

    async def _take(self) -> _Conn:
        """An idle connection the shard has not closed meanwhile (idle timeout, restart), else a new one."""
        while self._idle:
            conn = self._idle.pop()
            if conn.lost is None:
                return conn
            conn.sock.close()
        return await self._connect()

    def _error(self, code: Code, message: str, *, reason: Reason | None = None) -> ShardError:
        return ShardError(
            code,
            message,
            reason=reason,
            address=self.shard_address,
            shard_id=self.shard_id,
            call=f"Lookup (data plane at {self.address})",
        )

    async def lookup(
        self, *, table: int, ids: np.ndarray, dtype: int, dim: int, epoch: int, step: int = 0, max_staleness: int = 0
    ) -> tuple[torch.Tensor, int]:
        """(n,) int64 ids -> ((n, D) rows in `dtype` (fp8: (n, D + D/32) bytes), the shard's applied step). Raises ShardError
        for an error frame, DataPlaneDown when the connection fails."""
        conn = await self._take()
        ok = False
        try:
            out = await self._request(
                conn, table=table, ids=ids, dtype=dtype, dim=dim, epoch=epoch, step=step, max_staleness=max_staleness
            )
            ok = True
            return out
        except ShardError as err:
            ok = not getattr(err, "connection_closed", False)  # an error frame: in sync, stays usable
            raise
        except (ConnectionError, OSError) as exc:
            raise DataPlaneDown(f"data plane at {self.address}: {exc}") from None
        finally:
            if ok and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
            elif not ok:
                conn.sock.close()

    async def _request(self, conn: _Conn, *, table, ids, dtype, dim, epoch, step, max_staleness):
        rid = next(self._ids)
        n = int(ids.size)
        head = REQUEST.pack(
            REQUEST_MAGIC, VERSION, KIND_LOOKUP, rid, table, dtype, epoch, step, max_staleness, 0, n, 8 * n
        )
        ids = np.ascontiguousarray(ids, dtype="<i8")
        if n <= 8192:
            await conn.io.sendall(head + ids.tobytes())  # one send: header and ids in one segment
        else:
            await conn.io.sendall(head)
            await conn.io.sendall(memoryview(ids).cast("B"))
        await self._recv_exact(conn.io, memoryview(conn.head))
        magic, status, reply_id, _, applied_step, reply_dim, reply_dtype, body_len = REPLY.unpack(conn.head)
        connection_error = reply_id == 0 and status  # e.g. refused at connect (no read role)
        if magic != REPLY_MAGIC or (reply_id != rid and not connection_error):
            raise DataPlaneDown(
                f"data plane at {self.address}: reply {reply_id} magic {magic:#x} to request {rid}: out of sync"
            )
        if status:
            if body_len > MAX_ERROR_BYTES:
                raise DataPlaneDown(f"data plane at {self.address}: {body_len}-byte error message")
            body = bytearray(body_len)
            await self._recv_exact(conn.io, memoryview(body))
            err = self._error(
                CODE_OF.get(status, Code.UNKNOWN), body.decode("utf-8", "replace"), reason=reason_of_number(reply_dim)
            )
            err.connection_closed = bool(connection_error)  # type: ignore[attr-defined]  # the shard closes it
            raise err
        nbytes = n * row_bytes(dtype, dim)
        if reply_dtype != dtype or reply_dim != dim or body_len != nbytes:
            raise DataPlaneDown(
                f"data plane at {self.address}: malformed reply: {body_len} bytes, dim "
                f"{reply_dim}, dtype {reply_dtype} for {n} rows of {dim} dims in dtype {dtype}"
            )
        out = torch.empty((n, row_cols(dtype, dim)), dtype=ROW_DTYPES[dtype])  # (n, D), fp8 (n, D + D/32)
        if nbytes:
            await self._recv_exact(conn.io, out.view(torch.uint8).numpy().data.cast("B"))
        return out, applied_step

    @staticmethod
    async def _recv_exact(io: PlainIO | TlsIO, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            k = await io.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError(f"the shard closed the connection after {got} of {n} bytes")
            got += k

    def close(self) -> None:
        for conn in self._idle:
            conn.sock.close()
        self._idle.clear()
