"""uvicorn serving `worker.http_api` on the running event loop, beside the gRPC server.

The socket is bound here (port 0 -> a free port, known before READY is printed) and handed
to uvicorn; uvicorn's own signal handling is off: `engram serve` owns SIGTERM and calls `stop()`.

With `security.tls_enabled` it serves HTTPS with the process's certificate (security.tls_cert,
tls_key); with auth on and `require_client_cert` as well, a client must present a certificate
from the cluster's CA (security.tls_ca), like on gRPC. The bind rule is gRPC's: plaintext only on
loopback unless `security.allow_plaintext_public` (services/security/tls.check_bind). Unlike the
gRPC port, the HTTP port reads its certificate once: a rotated one is served after a restart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from tokenizers import Tokenizer

from engram.config import Config, SecurityConfig
from services.security import tls
from worker.http_api import Api
from worker.scheduler import Scheduler


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield


def ssl_options(sec: SecurityConfig) -> dict[str, Any]:
    """uvicorn.Config's TLS arguments for `sec` ({} when TLS is off); ConfigError if the files do not load."""
    if not sec.tls_enabled:
        return {}
    tls.check_pair(sec)
    mutual = sec.auth_enabled and sec.require_client_cert
    return {
        "ssl_certfile": sec.tls_cert,
        "ssl_keyfile": sec.tls_key,
        "ssl_ca_certs": sec.tls_ca,
        "ssl_cert_reqs": ssl.CERT_REQUIRED if mutual else ssl.CERT_NONE,
    }


class HttpServer:
    def __init__(
        self, *, scheduler: Scheduler, tok: Tokenizer, cfg: Config, host: str, port: int, grace_s: float
    ) -> None:
        self.tok_executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-tokenize")
        self.api = Api(
            scheduler=scheduler,
            tok=tok,
            model_name=cfg.worker.model_name,
            max_seq_len=cfg.model.max_seq_len,
            max_new_tokens=cfg.worker.max_new_tokens,
            tok_executor=self.tok_executor,
        )
        tls.check_bind(host, cfg.security, what=f"the worker's HTTP API on {host}")
        options = ssl_options(cfg.security)
        self.scheme = "https" if options else "http"
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            self.api.app(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(grace_s)),
            **options,
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises the startup error
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.api.serving = False  # /health 503, new completions 503; open streams run to the end
        self.server.should_exit = True
        if self._task is not None:
            await self._task
        self.tok_executor.shutdown(wait=False)
        self.sock.close()
