"""`engram config show`: print the resolved config tree (preset -> --config file -> --set overrides).

engram config show --preset tiny --set cluster.num_shards=4
engram config show --preset cpu --format json > run.json   # edit, then `engram train --config run.json`
"""

from __future__ import annotations

import argparse

from engram.config_args import add_config_args, config_from_args, render_config


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser(
        "show",
        help="print the resolved tree (TOML that `--config` reads back)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(show)
    show.add_argument("--format", choices=("toml", "json"), default="toml", help="output format (default: toml)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(render_config(config_from_args(args), args.format))
    return 0
