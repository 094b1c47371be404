"""`engram <command>`: each command lives in its own module with `register(subparsers)`.

Commands only parse arguments, build the config tree and call into the packages; they hold
no logic of their own.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

from engram.config import ConfigError
from engram.config_args import add_config_args  # noqa: F401  (re-exported: older imports of it)

# command module -> one-line help; modules are imported lazily so `engram train` never pays
# for grpc or redis imports it does not use.
COMMANDS = {
    "train": "train an Engram model (local, or on Ray with tables on the shards)",
    "up": "start a local cluster: Redis + N memory shards, no Docker",
    "shard": "run one memory-shard server process",
    "cluster": "control plane: init, status, rebalance, load",
    "serve": "run the model-worker inference server (gRPC + OpenAI-compatible HTTP)",
    "generate": "generate text from a running model worker",
    "health": "grpc.health.v1 check of a server (exit 0 when SERVING): container health checks",
    "plan": "capacity plan: bytes per shard, per-shard load, worker bandwidth, cache hit rate",
    "bench": "run a benchmark from benchmarks/ (`engram bench --list` names them all)",
    "config": "print the resolved config tree: `engram config show --preset tiny --set ...`",
    "certs": "throwaway CA and per-role certificates (compose, laptops; k8s uses cert-manager)",
}

OVERVIEW = """\
Engram conditional memory as a distributed system: hashed N-gram tables on gRPC memory shards,
a trainer (local or Ray) and an inference worker.

Quick start:
  engram train --preset cpu --ray --up --compare-baseline   train with tables on local shards
  engram up --preset tiny                                    keep a local cluster running
  engram serve --checkpoint runs/latest/checkpoint.pt        serve a trained model
  engram config show --preset tiny                           see every setting and its value
"""

EPILOG = """\
Configuration: train, up, shard, cluster and config take --preset NAME, --config FILE (TOML/JSON)
and --set section.field=value (repeatable); generate and health take them for security.* only.
serve takes the model's config from its checkpoint and --set worker.*/cluster.*/security.* only;
plan, certs and bench take their own flags.
`engram COMMAND --help` describes each command. Errors go to stderr; exit 2 means bad input.
"""


def version() -> str:
    try:
        return metadata.version("engram-memory")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram", description=OVERVIEW, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"engram {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"engram_cli.cmd_{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"engram_cli.cmd_{name}":
                raise
            continue
        module.register(
            sub.add_parser(
                name,
                help=help_text,
                description=module.__doc__ or help_text,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
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
