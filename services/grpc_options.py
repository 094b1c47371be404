"""gRPC settings in one place: message limits, keepalive, reconnect backoff, retries, reflection.

Every channel (client -> shard, shard -> shard during a migration) takes `channel_options`, every
server `server_options`, so a client's keepalive pings and the server's ping policy always agree:
a server refuses pings that come more often than it permits (GOAWAY "too_many_pings").
"""

from __future__ import annotations

import json
from typing import Any

import grpc

SHARD_SERVICE = "engram.shard.v1.MemoryShard"
WORKER_SERVICE = "engram.worker.v1.ModelWorker"
HEALTH_SERVICE = "grpc.health.v1.Health"

# Calls that change nothing on the server: gRPC may send them again on UNAVAILABLE (a restarting shard,
# a connection reset, a slot frozen for a moment by a migration). Writes (ApplyGradients, SetSlotMap,
# MigrateSlots, ...) are never retried by the channel: their callers decide.
IDEMPOTENT_METHODS = ((SHARD_SERVICE, "Lookup"), (SHARD_SERVICE, "Stats"), (HEALTH_SERVICE, "Check"))
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.05s",
    "maxBackoff": "0.2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config() -> str:
    """The channel's service config (JSON): the retry policy of the idempotent calls."""
    methods = [{"service": service, "method": method} for service, method in IDEMPOTENT_METHODS]
    return json.dumps({"methodConfig": [{"name": methods, "retryPolicy": RETRY_POLICY}]})


def channel_options(
    *, max_message_bytes: int, keepalive_s: float = 30.0, retries: bool = True
) -> list[tuple[str, Any]]:
    """A client channel: message limits, keepalive pings on open calls, fast reconnects, retries."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        # a dead peer behind a half-open TCP connection is noticed within keepalive_s * 4/3
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_s * 1000 / 3)),
        ("grpc.keepalive_permit_without_calls", 0),
        # a restarted shard is found again within ~0.1-1 s, not grpc's default 1-120 s backoff
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if retries:
        opts.append(("grpc.service_config", service_config()))
    return opts


def server_options(
    *, max_message_bytes: int, keepalive_s: float = 30.0, idle_connection_s: float = 600.0
) -> list[tuple[str, Any]]:
    """A server: message limits, pings to idle clients, and a ping policy that admits `channel_options`."""
    return [
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.so_reuseport", 0),
        # close half-open connections (no ping answer) and idle ones; clients reconnect on their own
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_s * 1000 / 3)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # clients ping every keepalive_s: accept pings twice as often before counting a strike
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(keepalive_s * 1000 / 2)),
        ("grpc.max_connection_idle_ms", int(idle_connection_s * 1000)),
    ]


def enable_reflection(server: grpc.aio.Server, *services: str) -> None:
    """Server reflection (grpc.reflection.v1alpha), so `grpcurl -plaintext HOST:PORT list` names the services.

    The services' descriptors must be in the default pool (their _pb2 modules imported).
    """
    from grpc_reflection.v1alpha import reflection

    reflection.enable_server_reflection((*services, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
