"""One grpc.aio channel per shard address, created on first use, with the callables the client needs.

The channels carry this process's `security` section: TLS with its certificate (its role) and
the CA, or plaintext with its bearer token, or plain plaintext (services/security/tls.py).
When the certificate files change (a renewal), channels opened from then on use the new ones
(checked every RELOAD_CHECK_S); the old channels stay open for the calls still on them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from engram.config import SecurityConfig
from proto.shard.v1 import shard_pb2_grpc
from services import grpc_options
from services.client.codec import decode_lookup_response
from services.security.tls import aio_channel, file_mtimes

LOOKUP_METHOD = "/engram.shard.v1.MemoryShard/Lookup"
RELOAD_CHECK_S = 10.0


def channel_options(max_message_mb: int, *, keepalive_s: float = 30.0) -> list[tuple[str, Any]]:
    """services.grpc_options' channel settings for a client of shards with these cluster limits."""
    return grpc_options.channel_options(max_message_bytes=int(max_message_mb) << 20, keepalive_s=keepalive_s)


@dataclass(slots=True)
class Endpoint:
    address: str
    channel: grpc.aio.Channel
    stub: shard_pb2_grpc.MemoryShardStub
    health: health_pb2_grpc.HealthStub
    lookup_raw: Any  # bytes (serialized LookupRequest) -> LookupReply, zero-copy rows


class ChannelPool:
    def __init__(self, options: list[tuple[str, Any]], security: SecurityConfig | None = None) -> None:
        self._options = options
        self.security = security or SecurityConfig()
        self._endpoints: dict[str, Endpoint] = {}
        self._retired: list[Endpoint] = []  # channels of replaced credentials, closed in close()
        self._mtimes = file_mtimes(self.security)
        self._next_check = time.monotonic() + RELOAD_CHECK_S

    def _check_files(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + RELOAD_CHECK_S
        mtimes = file_mtimes(self.security)
        if mtimes != self._mtimes:
            self._mtimes = mtimes
            self._retired += self._endpoints.values()
            self._endpoints = {}

    def get(self, address: str) -> Endpoint:
        if self.security.tls_enabled or self.security.token_file:
            self._check_files()
        ep = self._endpoints.get(address)
        if ep is None:
            channel = aio_channel(address, self.security, self._options)
            ep = Endpoint(
                address=address,
                channel=channel,
                stub=shard_pb2_grpc.MemoryShardStub(channel),
                health=health_pb2_grpc.HealthStub(channel),
                lookup_raw=channel.unary_unary(
                    LOOKUP_METHOD, request_serializer=None, response_deserializer=decode_lookup_response
                ),
            )
            self._endpoints[address] = ep
        return ep

    async def close(self) -> None:
        # channels of addresses that went away stay open until here: closing one would cancel
        # calls still in flight on it, and a shard's address changes only when it restarts
        endpoints, self._endpoints = [*self._endpoints.values(), *self._retired], {}
        self._retired = []
        for ep in endpoints:
            await ep.channel.close()
