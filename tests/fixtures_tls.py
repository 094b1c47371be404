"""One throwaway CA per test session and the identities it issues: the tests run with TLS and roles on.

`bundle()` writes a CA and one certificate per identity (services/security/certs.py: shard and
admin are admin, train, read) once per test process; the shared fixtures start every shard
with the "shard" identity (mTLS, auth on) unless a test about plaintext opts out, and tests
dial as the identity their client would have in a deployment:

    channel(address, "read")           # a sync gRPC channel as a worker would dial
    security("train")                  # the SecurityConfig of a trainer
    overrides("admin")                 # `--set` values for a CLI or worker process
"""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
from pathlib import Path
from typing import Any

import grpc

from engram.config import SecurityConfig
from services.security import certs
from services.security.tls import aio_channel as _aio_channel
from services.security.tls import client_ssl, sync_channel


@functools.cache
def bundle() -> dict[str, certs.Issued]:
    """identity -> certificate, key and CA paths; made once per test process, removed at exit."""
    folder = Path(tempfile.mkdtemp(prefix="engram-test-tls-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return certs.write_bundle(folder / "tls", hosts=["127.0.0.1"])


def security(role: str = "admin") -> SecurityConfig:
    """The `security` section of a process with this identity (TLS, its certificate, auth on)."""
    c = bundle()[role]
    return SecurityConfig(
        tls_enabled=True, tls_cert=str(c.cert), tls_key=str(c.key), tls_ca=str(c.ca), auth_enabled=True
    )


def overrides(role: str = "admin") -> list[str]:
    """`--set` values (without the flag) giving a process this identity."""
    return certs.overrides(bundle()[role])


def sets(role: str = "admin") -> list[str]:
    """`overrides(role)` as command-line arguments: ["--set", "security.tls_enabled=true", ...]."""
    return [a for o in overrides(role) for a in ("--set", o)]


def ssl_context(role: str = "read") -> ssl.SSLContext:
    """A client context trusting the session CA and presenting `role`'s certificate (httpx `verify=`)."""
    ctx = client_ssl(security(role))
    assert ctx is not None
    return ctx


def channel(address: str, role: str = "admin", options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    return sync_channel(address, security(role), options)


def aio_channel(address: str, role: str = "admin", options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    return _aio_channel(address, security(role), options)
