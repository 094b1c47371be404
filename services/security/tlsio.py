"""Byte streams for the TCP data plane over a non-blocking socket: plaintext, or TLS through memory BIOs.

Both expose `recv_into(view) -> bytes received (0 = closed)` and `sendall(data)`, so the data
plane's framing code stays the same. TLS runs `ssl.SSLObject` over two `ssl.MemoryBIO`s on the
event loop's own socket calls (asyncio's sock_* calls refuse SSL sockets): ciphertext is read
into a reusable buffer, decrypted straight into the caller's view.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

RECV_CHUNK = 256 << 10
SEND_CHUNK = 256 << 10  # plaintext per SSLObject.write: bounded ciphertext buffering


async def _recv_into(loop: asyncio.AbstractEventLoop, sock: socket.socket, view) -> int:
    """What is already there without a loop round (uvloop's sock_recv_into always waits for the
    socket to poll readable first: one more loop iteration per call), else wait for it."""
    try:
        return sock.recv_into(view)
    except (BlockingIOError, InterruptedError):
        return await loop.sock_recv_into(sock, view)


class PlainIO:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def recv_into(self, view: memoryview) -> int:
        return await _recv_into(self.loop, self.sock, view)

    async def sendall(self, data) -> None:
        await self.loop.sock_sendall(self.sock, data)


class TlsIO:
    def __init__(
        self, sock: socket.socket, ctx: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._buf = bytearray(RECV_CHUNK)
        self._eof = False

    async def _flush(self) -> None:
        if self._out.pending:
            await self.loop.sock_sendall(self.sock, self._out.read())

    async def _fill(self) -> None:
        n = await _recv_into(self.loop, self.sock, self._buf)
        if n == 0:
            self._eof = True
            self._in.write_eof()
        else:
            self._in.write(memoryview(self._buf)[:n])

    async def handshake(self) -> None:
        """Raises ssl.SSLError (a bad or missing certificate) or ConnectionError."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if self._eof:
                    raise ConnectionResetError("the peer closed the connection during the TLS handshake") from None
                await self._fill()
        await self._flush()

    def peercert(self) -> dict | None:
        return self.obj.getpeercert()

    async def recv_into(self, view: memoryview) -> int:
        while True:
            try:
                return self.obj.read(len(view), view)  # type: ignore[return-value]  # int with a buffer
            except ssl.SSLWantReadError:
                await self._flush()  # TLS 1.3 session tickets and the like
                if self._eof:
                    return 0
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0

    async def sendall(self, data) -> None:
        mv = memoryview(data).cast("B")
        for a in range(0, len(mv), SEND_CHUNK):
            self.obj.write(mv[a : a + SEND_CHUNK])
            await self._flush()
