"""`engram serve --checkpoint PATH`: the model-worker inference server (Score, Generate, health).

    engram serve --checkpoint runs/latest/checkpoint.pt --port 50061
    engram serve --checkpoint ckpt.pt --set worker.row_source=remote --set cluster.redis_url=redis://...

The checkpoint fixes the model; `--set` may change only `worker.*` and `cluster.*`. Prints
`READY address=HOST:PORT` once serving; SIGTERM shuts down cleanly (in-flight requests finish).
"""

from __future__ import annotations

import argparse
import sys


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by `engram train`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=None, help="port (default worker.port; 0 = a free port)")
    parser.add_argument("--grace-s", type=float, default=10.0, help="seconds in-flight requests get at shutdown")
    parser.add_argument("--grace", dest="grace_s", type=float, help=argparse.SUPPRESS)  # old spelling (k8s, compose)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a worker.* or cluster.* field (repeatable), e.g. --set worker.max_batch=16",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvloop

    from services.telemetry import setup_telemetry
    from worker.runtime import load_engine
    from worker.server import configure_logging, serve

    configure_logging()
    tel = setup_telemetry("engram-worker")  # OTEL_* variables are read here, once
    try:
        try:
            engine, tok, cfg = load_engine(args.checkpoint, args.overrides)
        except FileNotFoundError as exc:
            print(f"engram serve: {exc}", file=sys.stderr)
            return 2
        uvloop.run(serve(engine, tok, cfg, host=args.host, port=args.port, grace_s=args.grace_s))
    finally:
        tel.shutdown()
    return 0
