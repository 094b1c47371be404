"""Cross-references in the deployments: every name an object uses must exist where it is looked up.

    python scripts/deploy_refs.py                  # every k8s overlay and docker-compose.yml; exit 1 on a problem
    python scripts/deploy_refs.py --root /tmp/copy # a copy (tests break copies on purpose)

Objects that are each valid on their own can still not work together: the check that would have
caught the tracing component landing in `default` while the workloads read it from `engram`.

Kubernetes, each overlay rendered by `kubectl kustomize` (offline):
  - every namespaced object carries a namespace, and all carry the same one;
  - every configMapRef/secretRef (envFrom, env valueFrom, volumes, projected), persistentVolumeClaim,
    volumeMount and serviceAccountName resolves to an object rendered in that namespace (a Secret
    also resolves to the cert-manager Certificate that fills it)
    (`optional: true` does not excuse it in an overlay: it only hides the miss at run time);
  - every address a pod dials (URLs and host:port in env, args, command, the RayJob entrypoint and
    the ConfigMaps it reads or mounts) names a Service rendered in that namespace, on a port that
    Service exposes, and the NetworkPolicies that select the Service's pods admit the dialling pod;
  - every pod is selected by some NetworkPolicy;
  - the row data paths: a shard (`--advertise host:port`) listens on a fixed `cluster.data_port`
    (from `--set` or its mounted config) and registers host:data_port, which the shard itself and
    every pod labelled engram.io/shard-client=true dial (Service port, NetworkPolicy, as above); a
    container that sets `cluster.shm_dir` or `cluster.host_id` mounts a volume at that shm_dir.
docker-compose.yml: every depends_on, named volume, config and secret is declared; every address in
environment, command, entrypoint and mounted configs names a service that exposes the port;
every ${VAR} interpolation has a default; each shard exposes its fixed `cluster.data_port`; the
services that set `cluster.shm_dir` mount one volume there and share one `cluster.host_id`, and a
service that claims that host id mounts it too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from deploy_addresses import addresses, admits  # noqa: E402
from deploy_common import ROOT, compose_ports, pod_templates  # noqa: E402
from deploy_refs_compose import check_compose  # noqa: E402
from deploy_refs_k8s import CLUSTER_SCOPED, K8sRefs, check_overlays, kubectl_binary, render  # noqa: E402
from deploy_rowpaths import cluster_field, engram_sets  # noqa: E402

# the names tests and other scripts use from here (the checks live in deploy_refs_k8s / _compose)
__all__ = [
    "CLUSTER_SCOPED",
    "K8sRefs",
    "addresses",
    "admits",
    "check_compose",
    "check_overlays",
    "cluster_field",
    "compose_ports",
    "engram_sets",
    "kubectl_binary",
    "main",
    "pod_templates",
    "render",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree holding docker-compose.yml and k8s/")
    args = parser.parse_args(argv)
    problems = check_overlays(args.root)
    compose = args.root / "docker-compose.yml"
    problems += check_compose(yaml.safe_load(compose.read_text())) if compose.is_file() else [f"{compose}: missing"]
    for p in problems:
        print(f"FAIL {p}")
    print(f"deploy_refs: {len(problems)} problem(s)" if problems else "deploy_refs: every reference resolves")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
