"""The shard's TCP row data plane: a listener on cluster.data_port beside gRPC, on the shard's event
loop. Each accepted socket (TLS with the shard's current certificate when security.tls_enabled)
becomes a `Connection` (dataplane_conn.py): frames, validation, replies and bad input are there.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module

from services.security.tls import ServerSSL
from services.shard.dataplane_conn import CHUNK_BYTES, Connection, FrameRules
from services.shard.engine import ShardEngine

log = logging.getLogger("engram.shard")
SOCK_BUF = 4 << 20
HANDSHAKE_S = 10.0  # a TLS handshake that takes longer costs only its connection


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
        self.rules = FrameRules(
            engine, max_reply_bytes=max_reply_bytes, chunk_bytes=chunk_bytes, ssl=ssl, need_role=need_role
        )
        self.ssl = ssl
        self.port = 0
        self._listener: socket.socket | None = None
        self._accept: asyncio.Task | None = None
        self._opening: set[asyncio.Task] = set()  # TLS handshakes in progress

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
        tasks = [t for t in (self._accept, *self._opening) if t is not None]
        for t in tasks:
            t.cancel()
        for conn in list(self.rules.conns):
            conn.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:  # e.g. EMFILE: keep serving the connections there are
                log.warning("data plane: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            task = asyncio.create_task(self._open(sock))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, sock: socket.socket) -> None:
        """The connection's transport: plain, or TLS with the current certificate (a failed handshake
        costs only this connection)."""
        loop = asyncio.get_running_loop()
        try:
            if self.ssl is None:
                await loop.connect_accepted_socket(lambda: Connection(self.rules), sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: Connection(self.rules), sock, ssl=self.ssl.current(), ssl_handshake_timeout=HANDSHAKE_S
                )
        except (OSError, TimeoutError, ssl_module.SSLError) as exc:
            log.info("data plane: TLS handshake refused: %s", exc)
            sock.close()
        except BaseException:
            sock.close()
            raise
