"""The server side of the roles: one grpc.aio interceptor checks every RPC before its handler runs.

The role comes from the mTLS client certificate (SAN URI `engram-role:<role>`), else from a
bearer token in the `authorization` metadata. No role at all -> UNAUTHENTICATED; a role
below what the method needs (services/security/roles.py) -> PERMISSION_DENIED. Both messages
name the method and the role it needs.
"""

from __future__ import annotations

import inspect
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.errors import Code, Reason, ShardError, abort
from services.security.roles import TokenStore, allows, bearer, required_role, roles_from_uris

_CACHE = 256  # client certificates whose role is remembered (parsing a PEM per call is not free)


class CertRoles:
    def __init__(self) -> None:
        self._seen: OrderedDict[bytes, str | None] = OrderedDict()

    def role(self, auth: dict[str, list[bytes]]) -> str | None:
        for uri in auth.get("peer_uri", ()):  # gRPC's own SAN URI property, where this gRPC reports it
            role = roles_from_uris([uri.decode()])
            if role is not None:
                return role
        pems = auth.get("x509_pem_cert")
        if not pems:
            return None
        pem = pems[0]
        if pem in self._seen:
            self._seen.move_to_end(pem)
            return self._seen[pem]
        role = _role_of_pem(pem)
        self._seen[pem] = role
        if len(self._seen) > _CACHE:
            self._seen.popitem(last=False)
        return role


def _role_of_pem(pem: bytes) -> str | None:
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    return roles_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, *, tokens: TokenStore | None = None) -> None:
        self.tokens = tokens
        self.certs = CertRoles()
        self.refused = 0

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        need = required_role(method)
        token = bearer(details.invocation_metadata)
        token_role = None
        if token and self.tokens is not None:
            self.tokens.reload(now=time.monotonic())
            token_role = self.tokens.role(token)

        async def check(context: Any) -> None:
            role = self.certs.role(context.auth_context()) or token_role
            if role is None:
                self.refused += 1
                why = "the bearer token is not known" if token else "no client certificate role and no bearer token"
                await abort(context, _refusal(Code.UNAUTHENTICATED, f"{method} needs the '{need}' role: {why}"))
            if not allows(role, need):
                self.refused += 1
                text = f"{method} needs the '{need}' role; this caller has '{role}'"
                await abort(context, _refusal(Code.PERMISSION_DENIED, text))

        return _wrap(handler, check)


def _refusal(code: grpc.StatusCode, message: str) -> ShardError:
    reason = Reason.UNAUTHENTICATED if code == Code.UNAUTHENTICATED else Reason.PERMISSION_DENIED
    return ShardError(code, message, reason=reason)


def _wrap(h: Any, check: Callable[[Any], Awaitable[None]]) -> Any:
    kw = {"request_deserializer": h.request_deserializer, "response_serializer": h.response_serializer}
    if h.unary_unary is not None:
        inner = h.unary_unary

        async def uu(request: Any, context: Any) -> Any:
            await check(context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(uu, **kw)
    if h.stream_unary is not None:
        inner = h.stream_unary

        async def su(requests: Any, context: Any) -> Any:
            await check(context)
            return await inner(requests, context)

        return grpc.stream_unary_rpc_method_handler(su, **kw)
    streaming = h.unary_stream if h.unary_stream is not None else h.stream_stream
    factory = (
        grpc.unary_stream_rpc_method_handler if h.unary_stream is not None else grpc.stream_stream_rpc_method_handler
    )
    if inspect.isasyncgenfunction(streaming):

        async def gen(request: Any, context: Any) -> Any:
            await check(context)
            async for item in streaming(request, context):
                yield item

        return factory(gen, **kw)

    async def writer(request: Any, context: Any) -> Any:  # handlers that write with context.write
        await check(context)
        return await streaming(request, context)

    return factory(writer, **kw)


def server_interceptors(sec: Any) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server of this `security` section runs (none when auth is off)."""
    if not sec.auth_enabled:
        return []
    return [AuthInterceptor(tokens=TokenStore(sec.tokens_file) if sec.tokens_file else None)]
