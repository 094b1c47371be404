"""The `engram` command line as a user meets it: overview, --version, descriptions, flags, errors on stderr.

Real `python -m engram_cli.main` processes where the output streams matter; the parser in-process
where only the parsed values do.
"""

from __future__ import annotations

import argparse
import ast
import tomllib
from pathlib import Path

import pytest

from engram.config import PRESETS, ConfigError, load_config
from engram_cli.main import COMMANDS, build_parser
from tests.fixtures_procs import ROOT, engram_cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_is_an_overview_with_every_command() -> None:
    r = engram_cli("--help")
    assert r.returncode == 0, r.stderr
    assert "Quick start:" in r.stdout and "engram config show" in r.stdout
    assert "register(subparsers)" not in r.stdout  # not the module docstring for developers
    for name, line in COMMANDS.items():
        assert name in r.stdout, name
        assert " ".join(line.split()[:3]) in " ".join(r.stdout.split()), name


def test_version() -> None:
    r = engram_cli("--version")
    assert r.returncode == 0, r.stderr
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert r.stdout.strip() == f"engram {version}"


def test_every_subcommand_has_a_description_and_preset_lists_its_choices() -> None:
    subs = _subparsers(build_parser())
    assert set(subs) == set(COMMANDS)
    for name, sub in subs.items():
        assert sub.description and len(sub.description.strip()) > 10, name
        help_text = sub.format_help()
        if any("--preset" in a.option_strings for a in sub._actions):
            assert "{" + ",".join(PRESETS) + "}" in help_text, name


def test_durations_use_one_flag_style_and_old_spellings_still_parse() -> None:
    parser = build_parser()
    assert parser.parse_args(["serve", "--checkpoint", "c.pt", "--grace-s", "3"]).grace_s == 3.0
    assert parser.parse_args(["serve", "--checkpoint", "c.pt", "--grace", "15"]).grace_s == 15.0  # k8s/compose
    assert parser.parse_args(["serve", "--checkpoint", "c.pt"]).grace_s == 10.0
    assert parser.parse_args(["health", "--address", "h:1", "--timeout", "2"]).timeout_s == 2.0
    assert parser.parse_args(["generate", "x", "--timeout-s", "7"]).timeout_s == 7.0
    durations = 0
    for name, sub in _subparsers(parser).items():
        shown = sub.format_help()
        assert "--grace " not in shown and "--timeout " not in shown, name  # the old spellings are hidden
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or "second" not in (action.help or ""):
                continue
            durations += 1
            assert all(f.endswith("-s") for f in action.option_strings if f.startswith("--")), (name, action)
    assert durations >= 4


def _benchmark_files() -> set[str]:
    out = set()
    for path in (ROOT / "benchmarks").glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            out.add(path.stem)
    return out


def test_bench_lists_every_benchmark() -> None:
    expected = _benchmark_files()
    assert {"lookup", "shard_memory", "sync_equivalence", "train_throughput"} <= expected
    r = engram_cli("bench", "--list")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert listed == expected
    assert "machine" not in listed and "seed_stats" not in listed  # helpers, not benchmarks


def test_errors_go_to_stderr_with_exit_2() -> None:
    for args, needle in [
        (["train", "--preset", "nope"], "bad configuration: preset: unknown preset 'nope'"),
        (["config", "show", "--set", "model.ffn=bogus"], "bad configuration: model.ffn: unknown 'bogus'"),
        (["bench", "nosuch"], "invalid choice: 'nosuch'"),
    ]:
        r = engram_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)


def test_config_show_prints_the_resolved_tree_that_reads_back(tmp_path: Path) -> None:
    r = engram_cli("config", "show", "--preset", "tiny", "--set", "cluster.num_shards=4", "--set", "train.steps=7")
    assert r.returncode == 0, r.stderr
    tree = tomllib.loads(r.stdout)
    assert tree["cluster"]["num_shards"] == 4 and tree["train"]["steps"] == 7
    assert tree["model"]["d_model"] == PRESETS["tiny"]().model.d_model
    # the printed TOML, read as a --config file over another preset, gives back the same tree
    path = tmp_path / "run.toml"
    path.write_text(r.stdout)
    expected = load_config("tiny", None, ["cluster.num_shards=4", "train.steps=7"])
    assert load_config("paper27b", str(path)) == expected
    j = engram_cli("config", "show", "--preset", "tiny", "--format", "json")
    assert j.returncode == 0 and '"num_shards": 2' in j.stdout


def test_load_config_from_a_base_copies_it() -> None:
    base = load_config("tiny")
    cfg = load_config(overrides=["worker.max_batch=3"], base=base)
    assert cfg.worker.max_batch == 3 and base.worker.max_batch != 3
    assert cfg.model == base.model
    with pytest.raises(ConfigError, match="model.ffn: unknown 'x'"):
        load_config(base=base, data={"model": {"ffn": "x"}})


def test_every_enumeration_is_checked_in_one_place() -> None:
    from typing import Literal, get_args, get_origin, get_type_hints

    cfg = load_config("tiny")
    checked = 0
    for section in ("model", "engram", "train", "cluster", "dist", "worker"):
        for name, hint in get_type_hints(type(getattr(cfg, section))).items():
            if get_origin(hint) is not Literal:
                continue
            for value in get_args(hint):  # each value passes the choice check (other rules may still refuse it)
                try:
                    load_config("tiny", None, [f"{section}.{name}={value}"])
                except ConfigError as exc:
                    assert "unknown" not in exc.args[0], exc
            with pytest.raises(ConfigError, match=rf"{section}\.{name}: unknown 'bogus'"):
                load_config("tiny", None, [f"{section}.{name}=bogus"])
            checked += 1
    assert checked >= 9


def _config_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings} & {"--preset", "--config", "--set"}


def test_which_commands_take_preset_config_set_is_what_the_readme_and_help_say() -> None:
    """Every subcommand takes --preset/--config/--set, or the README and `engram --help` say it does not."""
    takes, only_set, neither = set(), set(), set()
    for name, sub in _subparsers(build_parser()).items():
        actions = _subparsers(sub) if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions) else {}
        for full, parser in {f"{name} {a}": p for a, p in actions.items()}.items() or [(name, sub)]:
            flags = _config_flags(parser)
            (takes if len(flags) == 3 else only_set if flags == {"--set"} else neither).add(full)
            assert flags in (set(), {"--set"}, {"--preset", "--config", "--set"}), (full, flags)
    cluster = {f"cluster {a}" for a in ("init", "status", "rebalance", "load", "import", "export")}
    assert takes == {"train", "up", "shard", "config show", "generate", "health", *cluster}
    assert only_set == {"serve"} and neither == {"plan", "certs", "bench"}
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`train`, `up`, `shard`, `cluster init|status|rebalance|load|import|export` and `config show` take" in readme
    assert "`generate` and `health` take `--preset/--config/--set` for their `security.*` settings only" in readme
    assert "`serve` takes its model's config from the checkpoint and `--set worker.*|cluster.*` only" in readme
    assert "`plan`, `certs` and `bench`" in readme and "take their own flags" in readme
    help_text = " ".join(engram_cli("--help").stdout.split())
    assert "train, up, shard, cluster and config take --preset NAME" in help_text
    assert "generate and health take them for security.* only" in help_text
    assert "plan, certs and bench take their own flags" in help_text
