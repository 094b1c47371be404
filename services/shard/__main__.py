"""`python -m services.shard`: run one memory-shard server (also `engram shard`).

    python -m services.shard --preset tiny --standalone --shard-id 0 --port 0
    python -m services.shard --set cluster.redis_url=redis://10.0.0.5:6379/0 --shard-id 3 --host 0.0.0.0

Exit codes: 0 after a clean SIGTERM/SIGINT shutdown, 2 when it cannot boot (bad configuration,
control plane down or not initialised, a checkpoint that does not verify), with the reason on
stderr. Once serving, stdout gets exactly one line: `READY shard=<id> address=<host:port>`.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvloop

from engram.config import ConfigError, load_config
from engram.config_args import add_config_args
from services.shard.errors import BootError


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--shard-id", type=int, default=0, help="this shard's id (>= 0)")
    parser.add_argument("--host", default=None, help="interface to bind (default: cluster.host)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--advertise", default="", help="host:port to register (default: host:port bound)")
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="no control plane: slot map = even split of cluster.num_slots over cluster.num_shards, epoch 1",
    )
    parser.add_argument("--threads", type=int, default=None, help="cluster.shard_threads (0: cores + 2, at most 8)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="cluster.shard_torch_threads: torch intra-op threads (0: cores // 4)",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=None,
        help="cluster.shard_grace_s: seconds in-flight calls get at shutdown (default 5)",
    )
    parser.add_argument(
        "--pending-wait-s",
        type=float,
        default=None,
        help="cluster.pending_wait_s: sync mode: how long a gradient of step s+1 waits for step s to collect "
        "its parts (then ABORTED; default 60)",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        flags = {
            "shard_threads": args.threads,
            "shard_torch_threads": args.torch_threads,
            "shard_grace_s": args.grace_s,
            "pending_wait_s": args.pending_wait_s,
        }
        cfg = load_config(
            args.preset,
            args.config,
            args.overrides,
            data={"cluster": {k: v for k, v in flags.items() if v is not None}},
        )
        if args.shard_id < 0:
            raise ConfigError(f"--shard-id: must be >= 0, got {args.shard_id}")
        if not 0 <= args.port < 65536:
            raise ConfigError(f"--port: {args.port} is not a TCP port")
        if args.standalone and args.shard_id >= cfg.cluster.num_shards:
            raise ConfigError(
                f"--shard-id {args.shard_id} is outside 0..{cfg.cluster.num_shards - 1} (cluster.num_shards)"
            )
        host = args.host or cfg.cluster.host
        from services.security.tls import check_bind  # plaintext only on loopback (docs/security.md)

        check_bind(host, cfg.security, what=f"shard {args.shard_id} gRPC and data plane")
        if args.metrics_port is not None:
            check_bind(host, cfg.security, what=f"shard {args.shard_id} metrics (--metrics-port)")
        # torch, grpc and the telemetry SDK load only past the cheap checks: bad arguments fail fast
        # (bad OTEL_* settings too: telemetry is checked before the server imports torch)
        from services.telemetry import setup_telemetry

        sec = cfg.security  # with TLS on, the metrics are HTTPS with the shard's certificate
        tel = setup_telemetry(
            "engram-shard",
            metrics_port=args.metrics_port,
            metrics_host=host,
            attributes={"engram.shard_id": args.shard_id},
            metrics_tls=(sec.tls_cert, sec.tls_key) if sec.tls_enabled else None,
        )
        try:
            from services.shard.server import ServeOptions, serve

            opts = ServeOptions(
                shard_id=args.shard_id,
                host=host,
                port=args.port,
                advertise=args.advertise,
                standalone=args.standalone,
                threads=cfg.cluster.shard_threads,
                torch_threads=cfg.cluster.shard_torch_threads,
                grace_s=cfg.cluster.shard_grace_s,
                pending_wait_s=cfg.cluster.pending_wait_s,
            )
            return uvloop.run(serve(cfg, opts))
        finally:
            tel.shutdown()  # flush spans and metrics inside the grace period
    except ConfigError as exc:
        print(f"engram shard {args.shard_id}: bad configuration: {exc}", file=sys.stderr, flush=True)
        return 2
    except BootError as exc:
        print(f"engram shard {args.shard_id}: cannot start: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
