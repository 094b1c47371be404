"""`engram bench NAME [args...]`: run benchmarks/NAME.py's main with the remaining arguments.

    engram bench --list
    engram bench lookup --quick --json benchmarks/results/lookup_cpu-2core.json
    engram bench quality --preset cpu

A benchmark is any benchmarks/*.py with a top-level `main(argv)`; its docstring's first line describes it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path


def benchmarks_dir() -> Path | None:
    spec = importlib.util.find_spec("benchmarks")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def discover(folder: Path | None = None) -> dict[str, str]:
    """name -> first docstring line, for every module of `folder` that defines `main` (read, not imported)."""
    folder = folder if folder is not None else benchmarks_dir()
    out: dict[str, str] = {}
    for path in sorted(folder.glob("*.py")) if folder is not None else []:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            out[path.stem] = ((ast.get_docstring(tree) or "").strip().splitlines() or [""])[0]
    return out


def register(parser: argparse.ArgumentParser) -> None:
    found = discover()
    parser.add_argument("--list", action="store_true", help="list the benchmarks with one line each, then exit")
    parser.add_argument(
        "name", nargs="?", choices=sorted(found), metavar="NAME", help=f"one of: {', '.join(sorted(found))}"
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list or args.name is None:
        found = discover()
        width = max((len(n) for n in found), default=0)
        for name, what in found.items():
            print(f"{name:<{width}}  {what}")
        if args.name is None and not args.list:
            print("engram bench: name a benchmark: engram bench NAME [--help]", file=sys.stderr)
            return 2
        return 0
    try:
        module = importlib.import_module(f"benchmarks.{args.name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"benchmarks.{args.name}":
            raise
        print(f"engram bench: benchmarks/{args.name}.py is not in this checkout", file=sys.stderr)
        return 2
    return int(module.main(list(args.args)) or 0)
