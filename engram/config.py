"""One typed config tree for the whole system.

A run is described by a `Config`: a preset (`tiny`, `cpu`, `small`, `paper27b`, `paper40b`,
`v41flash`) optionally merged with a JSON/TOML file and `section.field=value` overrides from the
command line. `validate()` fails fast with a `ConfigError` naming the offending field.

This module is the public face; the parts live beside it, one job each:
  config_schema.py    the sections (dataclasses) and their Literal enumerations
  config_presets.py   the named runs
  config_load.py      preset/base -> file -> dict -> overrides
  config_validate.py  the checks, enumerations in one place
"""

from __future__ import annotations

from engram.config_load import config_from_dict, load_config, parse_config_text
from engram.config_presets import PRESETS, cpu, paper27b, paper40b, small, tiny, v41flash
from engram.config_schema import (
    ROW_FORMATS,
    ROW_PATHS,
    Autocast,
    ClusterConfig,
    Config,
    ConfigError,
    DistConfig,
    DistMode,
    EngramConfig,
    Ffn,
    ModelConfig,
    Optimizer,
    RowFormat,
    RowMirror,
    RowPath,
    RowSource,
    SecurityConfig,
    TokenizerConfig,
    TrainConfig,
    WireDtype,
    WorkerConfig,
)
from engram.config_validate import check_choices, validate

__all__ = [
    "PRESETS",
    "ROW_FORMATS",
    "ROW_PATHS",
    "Autocast",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DistConfig",
    "DistMode",
    "EngramConfig",
    "Ffn",
    "ModelConfig",
    "Optimizer",
    "RowFormat",
    "RowMirror",
    "RowPath",
    "RowSource",
    "SecurityConfig",
    "TokenizerConfig",
    "TrainConfig",
    "WireDtype",
    "WorkerConfig",
    "check_choices",
    "config_from_dict",
    "cpu",
    "load_config",
    "paper27b",
    "paper40b",
    "parse_config_text",
    "small",
    "tiny",
    "v41flash",
    "validate",
]
