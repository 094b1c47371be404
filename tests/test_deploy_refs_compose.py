"""docker-compose.yml works together: every name, volume, address and the row data paths resolve.

Checks it with scripts/deploy_refs.py (its compose half), then breaks copies of the text on purpose
and asserts the checker names each break. The Kubernetes side is tests/test_deploy_refs.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import deploy_refs  # noqa: E402
from deploy_refs import check_compose  # noqa: E402


def _compose(text: str | None = None) -> dict:
    return yaml.safe_load(text if text is not None else (ROOT / "docker-compose.yml").read_text())


def test_compose_cross_references_resolve():
    data = _compose()
    assert check_compose(data) == []
    shm = data["volumes"]["shm"]
    assert shm["driver_opts"]["type"] == "tmpfs" and "uid=10001" in shm["driver_opts"]["o"]
    users = {name for name, svc in data["services"].items() if "shm:/dev/shm/engram" in (svc.get("volumes") or [])}
    assert users == {"shard-0", "shard-1", "shard-2", "worker"}
    for name, svc in data["services"].items():
        sets = deploy_refs.engram_sets([str(a) for a in svc.get("command") or []])
        if name in users:  # exactly the services that mount the volume point shm_dir at it and share one host id
            assert sets["cluster.shm_dir"] == "/dev/shm/engram" and sets["cluster.host_id"] == "engram-compose", name
        else:
            assert "cluster.host_id" not in sets and "cluster.shm_dir" not in sets, name
        if name.startswith("shard-"):
            assert sets["cluster.data_port"] == "50062" and 50062 in deploy_refs.compose_ports(svc), name


COMPOSE_BREAKS = {
    "OTLP endpoint on a port jaeger does not expose": (
        "OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger:4317",
        "OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger:4319",
        "services.shard-0: dials http://jaeger:4319: service jaeger exposes [4317, 4318, 16686] (expose/ports), not 4319",
    ),
    "Redis address names no service": (
        'redis_url = "redis://redis:6379/0"',
        'redis_url = "redis://cache:6379/0"',
        "services.cluster-init: dials redis://cache:6379: no service cache",
    ),
    "Ray address on a port the head does not expose": (
        'ray_address = "ray://ray-head:10001"',
        'ray_address = "ray://ray-head:10002"',
        "services.train: dials ray://ray-head:10002: service ray-head exposes",
    ),
    "undeclared volume": (
        "    - runs:/data/runs\n    - checkpoints:/data/checkpoints\n    - certs:/certs:ro\n  environment",
        "    - runs:/data/runs\n    - checkpoint:/data/checkpoints\n    - certs:/certs:ro\n  environment",
        "services.cluster-init: volume checkpoint: not declared under the top-level volumes",
    ),
    "data plane port a shard does not expose": (
        'expose: ["50060", "50062", "9464"]',
        'expose: ["50060", "9464"]',
        "services.shard-0: registers its data plane as shard-0:50062: service shard-0 exposes [9464, 50060]",
    ),
    "a shard on a random data port": (
        '"--set", "cluster.data_port=50062", ',
        "",
        "services.shard-0: the shard advertises shard-0:50060 but its data plane listens on a random port",
    ),
    "the worker names another host than the shards": (
        '"--set", "cluster.shm_dir=/dev/shm/engram", "--set", "cluster.host_id=engram-compose",',
        '"--set", "cluster.shm_dir=/dev/shm/engram", "--set", "cluster.host_id=elsewhere",',
        "services shard-0, shard-1, shard-2, worker share volume shm at /dev/shm/engram but set cluster.host_id "
        "['elsewhere', 'engram-compose']",
    ),
    "a Ray container claims the shared host id without the volume": (
        'command: ["train", "--ray", "--config", "/etc/engram/engram.toml",',
        'command: ["train", "--ray", "--config", "/etc/engram/engram.toml", "--set", "cluster.host_id=engram-compose",',
        "services.train: cluster.host_id=engram-compose claims the host of volume shm but does not mount it",
    ),
    "shm_dir where no volume is mounted": (
        '"--set", "cluster.shm_dir=/dev/shm/engram", "--set", "cluster.host_id=engram-compose",\n',
        '"--set", "cluster.shm_dir=/dev/shm", "--set", "cluster.host_id=engram-compose",\n',
        "services.worker: cluster.shm_dir /dev/shm (co-located row path) is not a named volume this service mounts",
    ),
    "interpolation without a default": (
        "OTEL_RESOURCE_ATTRIBUTES: deployment.environment=compose",
        "OTEL_RESOURCE_ATTRIBUTES: deployment.environment=${ENGRAM_ENV}",
        "services.worker: ${ENGRAM_ENV} has no default",
    ),
}


@pytest.mark.parametrize("case", list(COMPOSE_BREAKS))
def test_broken_compose_is_named(case):
    old, new, expected = COMPOSE_BREAKS[case]
    text = (ROOT / "docker-compose.yml").read_text()
    assert old in text, f"test fixture out of date: {old!r}"
    problems = check_compose(_compose(text.replace(old, new, 1)))
    assert any(expected in p for p in problems), problems
