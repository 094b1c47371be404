"""`engram <command>`: each command lives in its own module with `register(subparsers)`.

Commands only parse arguments, build the config tree and call into the packages; they hold
no logic of their own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engram.config import ConfigError

# command module -> one-line help; modules are imported lazily so `engram train` never pays
# for grpc or redis imports it does not use.
COMMANDS = {
    "train": "train an Engram model (local, or on Ray with tables on the shards)",
    "up": "start a local cluster: Redis + N memory shards, no Docker",
    "shard": "run one memory-shard server process",
    "cluster": "control plane: init, status, rebalance",
    "bench": "benchmarks: lookup, quality, prefetch",
    "serve": "run the model-worker inference server",
    "generate": "generate text from a running model worker",
    "plan": "capacity plan: bytes per shard, per-shard load, worker bandwidth, cache hit rate",
    "health": "grpc.health.v1 check of a server (exit 0 when SERVING): container health checks",
    "certs": "throwaway CA and per-role certificates (compose, laptops; k8s uses cert-manager)",
}


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    parser.add_argument("--preset", default=default_preset, help="tiny | cpu | small | paper27b | paper40b | v41flash")
    parser.add_argument("--config", default=None, help="JSON or TOML file merged over the preset")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable), e.g. --set train.steps=100",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"engram_cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"engram_cli.cmd_{name}":
                raise
            continue
        module.register(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"engram {args.command}: bad configuration: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
