"""`engram health --address host:port`: one grpc.health.v1 Check; exit 0 when SERVING, else 1.

The container health check of every Engram gRPC server (compose `healthcheck`, and anything
else without a native gRPC probe):

    engram health --address 127.0.0.1:50051                 # the server's overall status
    engram health --address shard-0:50051 --service engram.shard.v1.MemoryShard
"""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="seconds before the check counts as failed")
    parser.add_argument("--timeout", dest="timeout_s", type=float, help=argparse.SUPPRESS)  # old spelling
    parser.add_argument("--quiet", action="store_true", help="print nothing, only the exit status")
    parser.set_defaults(func=run)


def check(address: str, *, service: str = "", timeout_s: float = 3.0) -> tuple[bool, str]:
    """(serving, what was seen) for one Check call; never raises for network errors."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
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
    ok, seen = check(args.address, service=args.service, timeout_s=args.timeout_s)
    if not args.quiet:
        what = f" service {args.service!r}" if args.service else ""
        print(f"{args.address}{what}: {seen}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1
