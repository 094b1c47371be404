"""`engram shard`: run one memory-shard server process (same as `python -m services.shard`)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from services.shard.__main__ import add_args

    add_args(parser)
