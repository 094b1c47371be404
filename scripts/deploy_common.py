"""What the deploy checkers share: the report, the `engram`/`ray` command checks, small helpers.

Used by scripts/validate_deploy.py (entry point, Dockerfile), validate_compose.py, validate_k8s*.py
and deploy_refs*.py; it imports none of them, so there is no import cycle between the checkers.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo's packages (engram_cli, engram, services)
    sys.path.insert(0, str(ROOT))

K8S_VERSION = "1.33.0"
SOURCE_DIRS = ("engram", "engram_cli", "services", "worker", "trainer", "benchmarks")
# Variables our image's processes see that are read by something other than our code.
THIRD_PARTY_ENV = {
    "PYTHONUNBUFFERED": "python",
    "PYTHONDONTWRITEBYTECODE": "python",
    "MPLCONFIGDIR": "matplotlib",
    "RAY_ADDRESS": "ray",
    "RAY_USAGE_STATS_ENABLED": "ray",
    "OMP_NUM_THREADS": "torch/OpenMP",
    "CUDA_VISIBLE_DEVICES": "CUDA",
    "NVIDIA_VISIBLE_DEVICES": "nvidia-container-runtime",
    "HOME": "posix",
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
                self.report.note(
                    f"{where}: `engram {name}` is declared in engram_cli.main.COMMANDS but not "
                    "implemented yet: its flags were not checked"
                )
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
        from engram.config import ConfigError, load_config, parse_config_text

        path = getattr(args, "config", None)
        try:
            data = None
            if path is not None:
                if path not in files:
                    self.report.fail(where, f"--config {path}: no such file is mounted into the container")
                    return None
                data = parse_config_text(files[path], toml=path.endswith(".toml"))
            return load_config(getattr(args, "preset", "cpu"), None, args.overrides, data=data)
        except ConfigError as exc:
            self.report.fail(where, f"bad configuration: {exc}")
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

    def env(self, names: list[str], where: str, used_in_args: set[str] | frozenset[str] = frozenset()) -> None:
        from services.telemetry import standard_env

        otel = standard_env()
        for name in names:
            if name in used_in_args or name in THIRD_PARTY_ENV or name in otel:
                continue
            if name.startswith("OTEL_"):
                self.report.fail(
                    where,
                    f"environment {name}: not one of the OTEL_* variables the OpenTelemetry SDK defines (a typo?)",
                )
            elif not re.search(rf"\b{re.escape(name)}\b", self.code_text()):
                self.report.fail(
                    where,
                    f"environment {name}: set but read nowhere in the code "
                    f"({', '.join(SOURCE_DIRS)}) and not a known third-party variable",
                )

    def code_text(self) -> str:
        if self._code_text is None:
            self._code_text = "\n".join(
                p.read_text(errors="replace") for d in SOURCE_DIRS for p in sorted((self.root / d).rglob("*.py"))
            )
        return self._code_text


SHELLS = (["sh", "-c"], ["/bin/sh", "-c"], ["bash", "-c"], ["/bin/bash", "-c"])


OUR_IMAGE = "engram"  # built from this repository's Dockerfile; its digest exists once an operator pushes it
DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")


def unpinned_image(ref: str) -> str | None:
    """Why a third-party image reference is not reproducible, or None when it is pinned by digest."""
    if ref.split(":")[0].split("@")[0] == OUR_IMAGE:
        return None
    if not DIGEST_RE.search(ref):
        return f"image {ref}: not pinned by digest (name:tag@sha256:<64 hex>; a tag can move)"
    return None


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
        value = (
            argv[i + 1] if a == flag and i + 1 < len(argv) else a[len(flag) + 1 :] if a.startswith(flag + "=") else None
        )
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
        _LAYOUT_BYTES[key] = sum(
            t.num_rows * (t.dim + state_floats(t.dim)) * 4 for t in table_layouts(cfg.engram).values()
        )
    total = _LAYOUT_BYTES[key]
    copies = max(1, int(getattr(cfg.cluster, "replicas", 1)))  # each slot on `replicas` shards
    most_slots = -(-cfg.cluster.num_slots * copies // cfg.cluster.num_shards)
    return total * most_slots // cfg.cluster.num_slots


def run_tool(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def find_tool(name: str, *candidates: Path) -> str | None:
    for c in candidates:
        if c.is_file():
            return str(c)
    return shutil.which(name)


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Kubernetes objects


def labels_match(selector: dict | None, labels: dict) -> bool:
    """A Service's selector (a plain map): every pair is among the labels."""
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions), as a NetworkPolicy's podSelector; {} matches all."""
    selector = selector or {}
    if not labels_match(selector.get("matchLabels"), labels):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op)
        if ok is None:
            raise ValueError(f"unknown label selector operator {op!r}")
        if not ok:
            return False
    return True


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod template) pairs of a workload; RayJob has head, worker groups and the submitter."""
    kind, spec = doc["kind"], doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return [("pod", spec.get("template") or {})]
    if kind == "CronJob":
        return [("pod", ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {})]
    if kind == "RayJob":
        rc = spec.get("rayClusterSpec") or {}
        pods = [("ray-head", (rc.get("headGroupSpec") or {}).get("template") or {})]
        pods += [
            (f"ray-worker {g.get('groupName')}", g.get("template") or {}) for g in rc.get("workerGroupSpecs") or []
        ]
        if spec.get("submitterPodTemplate"):
            pods.append(("submitter", spec["submitterPodTemplate"]))
        return pods
    return []


def compose_ports(svc: dict) -> set[int]:
    """Ports a service's container listens on, as declared by `expose` and `ports` (targets)."""
    out: set[int] = set()
    for p in svc.get("expose") or []:
        out.add(int(str(p).split("/")[0].split("-")[0]))
    for p in svc.get("ports") or []:
        out.add(int(p["target"]) if isinstance(p, dict) else int(str(p).split("/")[0].rsplit(":", 1)[-1].split("-")[0]))
    return out


def volume_source(v: object) -> tuple[str, str]:
    """-> (type, source) of a service's volume entry (short or long syntax)."""
    if isinstance(v, dict):
        return str(v.get("type", "volume")), str(v.get("source", ""))
    source = str(v).split(":")[0]
    if ":" not in str(v):
        return "anonymous", ""
    return ("bind" if source.startswith((".", "/", "~", "$")) else "volume"), source
