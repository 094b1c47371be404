"""`engram health --address host:port`: one grpc.health.v1 Check; exit 0 when SERVING, else 1.

The container health check of every Engram gRPC server (compose `healthcheck`, and anything
else without a native gRPC probe):

    engram health --address 127.0.0.1:50051                 # the server's overall status
    engram health --address shard-0:50051 --service engram.shard.v1.MemoryShard
    engram health --address 127.0.0.1:50060 --config engram.toml --set security.tls_cert=/certs/read.pem ...

With TLS and roles on, the check needs the CA and a certificate (any role: Check needs read),
from the `security` section (`--config` / `--set`).
"""

from __future__ import annotations

import argparse
import sys

from engram_cli.main import add_config_args


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="seconds before the check counts as failed")
    parser.add_argument("--timeout", dest="timeout_s", type=float, help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--quiet", action="store_true", help="print nothing, only the exit status")
    add_config_args(parser, default_preset="tiny")  # only the security section is used
    parser.set_defaults(func=run)


def check(address: str, *, service: str = "", timeout_s: float = 3.0, security=None) -> tuple[bool, str]:  # type: ignore[no-untyped-def]
    """(serving, what was seen) for one Check call; never raises for network errors."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from engram.config import SecurityConfig
    from services.security.tls import sync_channel

    with sync_channel(address, security or SecurityConfig()) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def run(args: argparse.Namespace) -> int:
    host, sep, port = args.address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        print(f"engram health: --address must be host:port, got {args.address!r}", file=sys.stderr)
        return 2
    from engram.config import load_config

    cfg = load_config(args.preset, args.config, args.overrides)
    ok, seen = check(args.address, service=args.service, timeout_s=args.timeout_s, security=cfg.security)
    if not args.quiet:
        what = f" service {args.service!r}" if args.service else ""
        print(f"{args.address}{what}: {seen}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
