"""Building a config tree: a preset or a base tree, then a file, a dict and `section.field=value` overrides."""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from engram.config_presets import PRESETS
from engram.config_schema import Config, ConfigError
from engram.config_validate import validate


def _set_path(cfg: Config, dotted: str, value: Any) -> None:
    section_name, _, field_name = dotted.partition(".")
    section = getattr(cfg, section_name, None)
    if section is None or not dataclasses.is_dataclass(section) or not field_name:
        raise ConfigError(
            f"{dotted}: unknown config field (expected section.field, sections: "
            f"{', '.join(f.name for f in dataclasses.fields(cfg))})"
        )
    names = {f.name: f for f in dataclasses.fields(section)}
    if field_name not in names:
        raise ConfigError(f"{dotted}: unknown field of '{section_name}' (known: {', '.join(names)})")
    current = getattr(section, field_name)
    setattr(section, field_name, _coerce(dotted, value, current))


def _coerce(dotted: str, value: Any, current: Any) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if current is not None:
                raise ConfigError(f"{dotted}: cannot parse {value!r}") from None
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted}: expected true/false, got {value!r}")
    elif isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted}: expected an integer, got {value!r}")
    elif isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(current, list):
        if not isinstance(value, list):
            raise ConfigError(f"{dotted}: expected a list, got {value!r}")
    return value


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_config_text(text: str, *, toml: bool) -> dict[str, Any]:
    """The nested dict of a `--config` file's text (TOML or JSON)."""
    try:
        data = tomllib.loads(text) if toml else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file: not valid {'TOML' if toml else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file: expected a table of sections, got {type(data).__name__}")
    return data


def load_config(
    preset: str = "cpu",
    file: str | None = None,
    overrides: list[str] | None = None,
    *,
    base: Config | None = None,
    data: dict[str, Any] | None = None,
) -> Config:
    """base (a copy of it) or preset -> merged file -> merged `data` -> `a.b=value` overrides -> validated Config."""
    if base is not None:
        cfg = copy.deepcopy(base)
    elif preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    else:
        cfg = PRESETS[preset]()
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file: {file} does not exist")
        for dotted, value in _flatten(parse_config_text(path.read_text(), toml=path.suffix == ".toml")).items():
            _set_path(cfg, dotted, value)
    for dotted, value in _flatten(data or {}).items():
        _set_path(cfg, dotted, value)
    for item in overrides or []:
        dotted, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        _set_path(cfg, dotted.strip(), value.strip())
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of `Config.to_dict` (checkpoints and the control plane store the tree)."""
    cfg = Config()
    for dotted, value in _flatten(data).items():
        _set_path(cfg, dotted, value)
    validate(cfg)
    return cfg
