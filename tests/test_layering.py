"""Layers import only downward and never in a circle; `engram/` imports no network, Redis, Ray or tracing.

    engram, proto  <-  services  <-  worker | trainer  <-  engram_cli  <-  benchmarks <- scripts <- tests

Every `import` in every module counts, including the late ones inside functions (a late import is
how a cycle usually hides); only `if TYPE_CHECKING:` blocks are skipped. The detector is tested on
synthetic trees first, so a green run means "no cycle" rather than "a detector that finds nothing".
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the packages it may import (itself included)
_BASE = {"engram", "proto"}
ALLOWED: dict[str, set[str]] = {
    "engram": {"engram"},
    "proto": {"proto"},
    "services": _BASE | {"services"},
    "worker": _BASE | {"services", "worker"},
    "trainer": _BASE | {"services", "trainer"},
    "engram_cli": _BASE | {"services", "worker", "trainer", "engram_cli"},
    "benchmarks": _BASE | {"services", "worker", "trainer", "engram_cli", "benchmarks"},
    "scripts": _BASE | {"services", "worker", "trainer", "engram_cli", "benchmarks", "scripts"},
    "tests": _BASE | {"services", "worker", "trainer", "engram_cli", "benchmarks", "scripts", "tests"},
}
# third-party modules the pure-math layer may use (everything else outside the stdlib is refused)
ENGRAM_THIRD_PARTY = {"numpy", "torch", "tokenizers"}


# ---------------------------------------------------------------------------------------------
# the detector


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the given top-level folders (no generated code)."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")) or ".venv" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                stack.extend(child.orelse)  # type: ignore[attr-defined]
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            stack.append(child)


def raw_imports(name: str, path: Path, *, is_package: bool) -> list[str]:
    """Absolute dotted names this module imports (`from a import b` gives both a and a.b)."""
    out: list[str] = []
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from its package, up level - 1
            pkg = name.split(".") if is_package else name.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        out.append(base)
        out.extend(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return out


def import_graph(root: Path, packages: Iterable[str], *, flat: Iterable[str] = ()) -> dict[str, set[str]]:
    """Module -> the project modules it imports. `flat` folders (scripts/) import siblings by bare name."""
    files = module_files(root, packages)
    flat = set(flat)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        top = name.split(".")[0]
        edges: set[str] = set()
        for target in raw_imports(name, path, is_package=path.name == "__init__.py"):
            if top in flat and target.split(".")[0] not in files and f"{top}.{target}" in files:
                target = f"{top}.{target}"  # `from deploy_common import ...` inside scripts/
            # the longest known prefix: `from a.b import c` is the module a.b.c when there is one
            parts = target.split(".")
            while parts and ".".join(parts) not in files:
                parts.pop()
            if parts and ".".join(parts) != name:
                edges.add(".".join(parts))
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    scc.append(member)
                    if member == node:
                        break
                if len(scc) > 1:
                    out.append(sorted(scc))
    return out


def upward_imports(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        layer = module.split(".")[0]
        for target in sorted(targets):
            if target.split(".")[0] not in allowed.get(layer, {layer}):
                bad.append(f"{module} -> {target}")
    return bad


def third_party_imports(root: Path, package: str) -> list[str]:
    """`module: top-level import` for every import of `package` outside the stdlib and the package itself."""
    out = []
    for name, path in module_files(root, [package]).items():
        for target in raw_imports(name, path, is_package=path.name == "__init__.py"):
            top = target.split(".")[0]
            if top and top != package and top != "__future__" and top not in sys.stdlib_module_names:
                out.append(f"{name}: {top}")
    return sorted(set(out))


# ---------------------------------------------------------------------------------------------
# the detector on synthetic trees


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_detector_finds_a_late_import_cycle(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "engram/__init__.py": "",
            "engram/data.py": "from engram.tokenizer import train\n",
            "engram/tokenizer.py": "def train():\n    from engram.data import docs  # late\n",
            "engram/ok.py": "import engram.data\n",
        },
    )
    graph = import_graph(root, ["engram"])
    assert graph["engram.data"] == {"engram.tokenizer"}
    assert cycles(graph) == [["engram.data", "engram.tokenizer"]]


def test_detector_finds_relative_and_flat_cycles_and_skips_type_checking(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "services/__init__.py": "",
            "services/a.py": "from . import b\n",
            "services/b.py": "from .c import x\n",
            "services/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from services.a import y\n",
            "scripts/one.py": "from two import f\n",
            "scripts/two.py": "import three\n",
            "scripts/three.py": "def g():\n    import one\n",
        },
    )
    graph = import_graph(root, ["services", "scripts"], flat=["scripts"])
    assert graph["services.a"] == {"services", "services.b"}
    assert graph["services.c"] == set()  # TYPE_CHECKING only
    assert cycles(graph) == [["scripts.one", "scripts.three", "scripts.two"]]
    # closing the services ring outside TYPE_CHECKING makes it a cycle too
    (root / "services/c.py").write_text("import services.a\n")
    assert ["services.a", "services.b", "services.c"] in cycles(import_graph(root, ["services"]))


def test_detector_finds_upward_and_forbidden_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "engram/__init__.py": "import grpc\nimport numpy\nimport json\n",
            "services/__init__.py": "",
            "services/main.py": "from engram_cli.main import add_config_args\nfrom engram import x\n",
            "worker/__init__.py": "",
            "worker/run.py": "def f():\n    from trainer.checkpoint import load\n",
            "trainer/__init__.py": "",
            "trainer/checkpoint.py": "",
            "engram_cli/__init__.py": "",
            "engram_cli/main.py": "",
            "scripts/draw.py": "from tests.receiver import R\n",
            "tests/__init__.py": "",
            "tests/receiver.py": "import scripts.draw\n",
        },
    )
    pkgs = ["engram", "services", "worker", "trainer", "engram_cli", "scripts", "tests"]
    bad = upward_imports(import_graph(root, pkgs, flat=["scripts"]), ALLOWED)
    assert bad == [
        "scripts.draw -> tests.receiver",
        "services.main -> engram_cli.main",
        "worker.run -> trainer.checkpoint",
    ]
    assert third_party_imports(root, "engram") == ["engram: grpc", "engram: numpy"]


# ---------------------------------------------------------------------------------------------
# the real tree

PACKAGES = list(ALLOWED)


def test_no_import_cycles() -> None:
    graph = import_graph(ROOT, PACKAGES, flat=["scripts"])
    assert len(graph) > 100, "the detector saw too few modules to mean anything"
    assert cycles(graph) == []


def test_layers_import_only_downward() -> None:
    assert upward_imports(import_graph(ROOT, PACKAGES, flat=["scripts"]), ALLOWED) == []


def test_engram_imports_no_network_redis_ray_or_tracing() -> None:
    bad = [line for line in third_party_imports(ROOT, "engram") if line.split(": ")[1] not in ENGRAM_THIRD_PARTY]
    assert bad == []
