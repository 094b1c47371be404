"""Schema checks of rendered k8s objects: Kubernetes' own (strict), KubeRay's RayJob CRD, cert-manager's."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml
from deploy_certmanager import is_cert_manager
from deploy_certmanager import problems as cert_manager_problems
from deploy_common import Checker


def strict_schema(schema: Any) -> Any:
    """An openAPIV3Schema that rejects unknown fields, as the API server's strict field validation does."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=4)
def rayjob_schema(schemas: Path) -> dict | None:
    path = schemas / "kuberay-ray.io_rayjobs.yaml"
    if not path.is_file():
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRD is 25k lines
    crd = yaml.load(path.read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict_schema(version["schema"]["openAPIV3Schema"])


_VERDICTS: dict[str, list[str]] = {}  # object (as JSON) + version -> schema problems; base repeats in overlays


def validate_schemas(docs: list[dict], rel: str, *, version: str, ray_schema: dict | None, checker: Checker) -> None:
    for doc in docs:
        where = f"{rel} {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        key = f"{version} {ray_schema is not None} {json.dumps(doc, sort_keys=True)}"
        if key not in _VERDICTS:
            _VERDICTS[key] = _schema_problems(doc, version, ray_schema)
        for problem in _VERDICTS[key]:
            checker.report.fail(where, problem)


def _schema_problems(doc: dict, version: str, ray_schema: dict | None) -> list[str]:
    import jsonschema
    import kubernetes_validate

    if is_cert_manager(doc):
        return cert_manager_problems(doc)
    if doc.get("kind") == "RayJob":
        if ray_schema is None:
            return []
        return [
            f"KubeRay RayJob schema at {'/'.join(str(p) for p in err.absolute_path) or '(top level)'}: {err.message}"
            for err in jsonschema.Draft7Validator(ray_schema).iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        at = "/".join(str(p) for p in getattr(err, "absolute_path", [])) or "(top level)"
        return [f"Kubernetes {version} schema at {at}: {getattr(err, 'message', err)}"]
    except Exception as err:  # unknown kind/version: the schema set has no such object
        return [f"Kubernetes {version} schema: {str(err).splitlines()[0]}"]
    return []
