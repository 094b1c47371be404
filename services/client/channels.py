"""One grpc.aio channel per shard address, created on first use, with the callables the client needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from proto.shard.v1 import shard_pb2_grpc
from services import grpc_options
from services.client.codec import decode_lookup_response

LOOKUP_METHOD = "/engram.shard.v1.MemoryShard/Lookup"


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
    def __init__(self, options: list[tuple[str, Any]]) -> None:
        self._options = options
        self._endpoints: dict[str, Endpoint] = {}

    def get(self, address: str) -> Endpoint:
        ep = self._endpoints.get(address)
        if ep is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
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
        endpoints, self._endpoints = list(self._endpoints.values()), {}
        for ep in endpoints:
            await ep.channel.close()
