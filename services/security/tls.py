"""TLS credentials from the `security` config section, for gRPC and the TCP data plane.

Servers: `add_port` listens with TLS (mTLS when `require_client_cert`) or plaintext. The
certificate, key and CA are re-read when their files change: gRPC asks `_Reloader.fetch` at
every new connection (`grpc.dynamic_ssl_server_credentials`), the data plane at every
accept, so a rotated certificate (cert-manager renewing a Secret) takes effect without a
restart; connections already open keep the old one.
Clients: `aio_channel` / `sync_channel` dial with the CA, this process's certificate (its
role) and, where it has one, its bearer token.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from pathlib import Path
from typing import Any

import grpc

from engram.config import ConfigError, SecurityConfig
from services.security.roles import roles_from_uris

log = logging.getLogger("engram.security")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"security.{what}: cannot read {path}: {exc.strerror}") from None


def file_mtimes(sec: SecurityConfig) -> tuple[int, ...]:
    """Modification times of the certificate, key, CA and token files (-1: absent)."""
    return _mtimes(sec) + _mtimes(sec, (sec.token_file,))


def _mtimes(sec: SecurityConfig, paths: tuple[str, ...] | None = None) -> tuple[int, ...]:
    out = []
    for p in paths if paths is not None else (sec.tls_cert, sec.tls_key, sec.tls_ca):
        try:
            out.append(os.stat(p).st_mtime_ns)
        except OSError:
            out.append(-1)
    return tuple(out)


def check_pair(sec: SecurityConfig) -> None:
    """The certificate and key load and belong together (ssl checks the pair) -> else ConfigError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(sec.tls_cert, sec.tls_key)
        ctx.load_verify_locations(sec.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"security.tls_cert: {sec.tls_cert} with key {sec.tls_key} and CA {sec.tls_ca} do not load: {exc}"
        ) from None


class _Reloader:
    """Serves the current certificate files; a change is picked up at the next connection."""

    def __init__(self, sec: SecurityConfig) -> None:
        self.sec = sec
        self._mtimes = _mtimes(sec)
        self.reloads = 0

    def config(self) -> Any:
        s = self.sec
        return grpc.ssl_server_certificate_configuration(
            [(_read(s.tls_key, "tls_key"), _read(s.tls_cert, "tls_cert"))], root_certificates=_read(s.tls_ca, "tls_ca")
        )

    def changed(self) -> bool:
        m = _mtimes(self.sec)
        if m == self._mtimes:
            return False
        try:
            check_pair(self.sec)  # half-rotated files (a new cert, the old key) wait for the next call
        except ConfigError as exc:
            log.warning("certificate files changed but do not load yet, keeping the current ones: %s", exc)
            return False
        self._mtimes = m
        self.reloads += 1
        log.info("certificate files changed: serving %s from now on (reload %d)", self.sec.tls_cert, self.reloads)
        return True

    def fetch(self) -> Any:
        try:
            return self.config() if self.changed() else None
        except ConfigError as exc:
            log.warning("certificate reload failed, keeping the current one: %s", exc)
            return None


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_bind(host: str, sec: SecurityConfig, *, what: str) -> None:
    """Plaintext only on loopback, unless `security.allow_plaintext_public` (a loud warning) -> ConfigError."""
    if sec.tls_enabled or is_loopback(host):
        return
    if sec.allow_plaintext_public:
        log.warning(
            "!!! %s serves PLAINTEXT on %s (security.allow_plaintext_public=true): anyone who can reach "
            "this address can read and, without auth, change the tables. Use this on a trusted network "
            "only; set security.tls_enabled=true otherwise. !!!",
            what,
            host or "all interfaces",
        )
        return
    raise ConfigError(
        f"security.tls_enabled: {what} would listen on {host or 'all interfaces'} without TLS; "
        "refusing. Turn TLS on (security.tls_enabled=true with tls_cert/tls_key/tls_ca), bind a "
        "loopback address, or set security.allow_plaintext_public=true on a trusted network"
    )


def add_port(server: Any, address: str, sec: SecurityConfig) -> tuple[int, _Reloader | None]:
    """Listen on `address` (TLS per `sec`) -> (port, the reloader when TLS)."""
    host = address.rpartition(":")[0]
    check_bind(host, sec, what=f"gRPC on {address}")
    if not sec.tls_enabled:
        return server.add_insecure_port(address), None
    check_pair(sec)
    reloader = _Reloader(sec)
    creds = grpc.dynamic_ssl_server_credentials(
        reloader.config(), reloader.fetch, require_client_authentication=sec.require_client_cert
    )
    return server.add_secure_port(address, creds), reloader


# -------------------------------------------------------------------------------------------------
# clients


def read_token(sec: SecurityConfig) -> str:
    if not sec.token_file:
        return ""
    token = _read(sec.token_file, "token_file").decode().strip()
    if not token:
        raise ConfigError(f"security.token_file: {sec.token_file} is empty")
    return token


def channel_credentials(sec: SecurityConfig) -> grpc.ChannelCredentials:
    key = _read(sec.tls_key, "tls_key") if sec.tls_key else None
    cert = _read(sec.tls_cert, "tls_cert") if sec.tls_cert else None
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(sec.tls_ca, "tls_ca"), private_key=key, certificate_chain=cert
    )
    token = read_token(sec)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def _options(sec: SecurityConfig, options: list[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    out = list(options or [])
    if sec.tls_enabled and sec.server_name:
        out.append(("grpc.ssl_target_name_override", sec.server_name))
    return out


def aio_channel(address: str, sec: SecurityConfig, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    if sec.tls_enabled:
        return grpc.aio.secure_channel(address, channel_credentials(sec), options=_options(sec, options))
    token = read_token(sec)
    if token:  # gRPC sends call credentials only over TLS: plaintext (trusted network) adds the header itself
        from services.security.token_client import aio_interceptors

        return grpc.aio.insecure_channel(address, options=options, interceptors=aio_interceptors(token))
    return grpc.aio.insecure_channel(address, options=options)


def sync_channel(address: str, sec: SecurityConfig, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    if sec.tls_enabled:
        return grpc.secure_channel(address, channel_credentials(sec), options=_options(sec, options))
    channel = grpc.insecure_channel(address, options=options)
    token = read_token(sec)
    if token:
        from services.security.token_client import sync_interceptor

        channel = grpc.intercept_channel(channel, sync_interceptor(token))
    return channel


# -------------------------------------------------------------------------------------------------
# the TCP data plane (ssl module)


def _tls_floor(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class ServerSSL:
    """The data plane's server context, rebuilt when the certificate files change (checked per accept)."""

    def __init__(self, sec: SecurityConfig) -> None:
        self.sec = sec
        self._reloader = _Reloader(sec)
        self.context = self._build()

    def _build(self) -> ssl.SSLContext:
        ctx = _tls_floor(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        ctx.load_cert_chain(self.sec.tls_cert, self.sec.tls_key)
        ctx.load_verify_locations(self.sec.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.sec.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def current(self) -> ssl.SSLContext:
        if self._reloader.changed():
            self.context = self._build()
        return self.context


def client_ssl(sec: SecurityConfig) -> ssl.SSLContext | None:
    if not sec.tls_enabled:
        return None
    ctx = _tls_floor(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(sec.tls_ca)
    if sec.tls_cert:
        ctx.load_cert_chain(sec.tls_cert, sec.tls_key)
    return ctx


def peer_role(peercert: dict | None) -> str | None:
    """`ssl.SSLObject.getpeercert()` -> the role its SAN URIs carry."""
    if not peercert:
        return None
    return roles_from_uris(v for k, v in peercert.get("subjectAltName", ()) if k == "URI")
