"""The command-line face of the config tree: `--preset/--config/--set` and printing a resolved tree.

Every entry point (the `engram` CLI, `python -m services.shard`, the benchmarks) adds these flags
here, so the CLI imports the services and never the other way round.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from engram.config import PRESETS, Config, load_config


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "cpu") -> None:
    # the choices are listed, not enforced by argparse: load_config names an unknown preset (exit 2)
    parser.add_argument(
        "--preset",
        default=default_preset,
        metavar="{" + ",".join(PRESETS) + "}",
        help=f"base configuration (default: {default_preset})",
    )
    parser.add_argument("--config", default=None, metavar="FILE", help="JSON or TOML file merged over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable), e.g. --set train.steps=100",
    )


def config_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Config:
    """preset -> --config file -> --set overrides (then `extra` overrides) -> a validated Config."""
    return load_config(args.preset, args.config, [*args.overrides, *(extra or [])])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def render_config(cfg: Config, fmt: str = "toml") -> str:
    """The whole tree, one `[section]` per dataclass; the TOML reads back as a `--config` file."""
    if fmt == "json":
        return json.dumps(cfg.to_dict(), indent=2)
    if fmt != "toml":
        raise ValueError(f"render_config: unknown format {fmt!r} (toml or json)")
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            lines.append(f"# {f.name} = null (unset)" if value is None else f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
