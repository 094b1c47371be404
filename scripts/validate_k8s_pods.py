"""What schemas miss in one kustomize rendering: commands, probes, Services, NetworkPolicies, shard sizing."""

from __future__ import annotations

import re
import shlex
from typing import Any

from deploy_common import (
    SHELLS,
    Checker,
    Cmd,
    host_port,
    labels_match,
    pod_templates,
    selector_matches,
    shell_engram_argvs,
    table_bytes_per_shard,
    unpinned_image,
)

SHARD_CLIENTS = ("serve", "train", "cluster", "bench")  # commands that talk to the shards
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
PROCESS_OVERHEAD = 256 * 2**20  # python + torch + grpc of one shard process (measured ~252 MiB)


def quantity(value: Any) -> float:
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if not m or (m.group(2) and m.group(2) not in UNITS):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(m.group(1)) * UNITS.get(m.group(2), 1)


class Rendered:
    """Cross-checks on one kustomize rendering."""

    def __init__(self, docs: list[dict], rel: str, checker: Checker) -> None:
        self.docs, self.rel, self.checker, self.report = docs, rel, checker, checker.report
        self.configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
        self.services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        # (where, owner doc, role, pod template, {container name: Cmd})
        self.pods: list[tuple[str, dict, str, dict, dict[str, Cmd]]] = []

    def where(self, doc: dict, role: str = "pod") -> str:
        suffix = "" if role == "pod" else f" ({role})"
        return f"{self.rel} {doc['kind']}/{doc['metadata']['name']}{suffix}"

    def check(self) -> set[int]:
        listen: set[int] = set()
        for doc in self.docs:
            for role, template in pod_templates(doc):
                cmds = self._pod(doc, role, template)
                self.pods.append((self.where(doc, role), doc, role, template, cmds))
                listen |= {c.port for c in cmds.values() if c.port}
                listen |= {
                    c.args.metrics_port for c in cmds.values() if c.args and getattr(c.args, "metrics_port", None)
                }
        for doc in self.docs:
            if doc["kind"] == "RayJob":
                self._rayjob(doc)
        self._services()
        self._network_policies()
        self._cluster()
        return listen

    def _pod(self, doc: dict, role: str, template: dict) -> dict[str, Cmd]:
        where, spec = self.where(doc, role), template.get("spec") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        psc = spec.get("securityContext") or {}
        cmds: dict[str, Cmd] = {}
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            cw = f"{where} container {c.get('name')}"
            sc = c.get("securityContext") or {}
            if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                self.report.fail(cw, "runAsNonRoot must be true (pod or container securityContext)")
            seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                self.report.fail(cw, "seccompProfile.type must be RuntimeDefault")
            if sc.get("allowPrivilegeEscalation") is not False:
                self.report.fail(cw, "securityContext.allowPrivilegeEscalation must be false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                self.report.fail(cw, "securityContext.capabilities.drop must contain ALL")
            if "readOnlyRootFilesystem" not in sc and role != "submitter":
                self.report.fail(cw, "securityContext.readOnlyRootFilesystem must be set (true where possible)")
            if not (c.get("resources") or {}).get("requests"):
                self.report.fail(cw, "no resources.requests")
            if problem := unpinned_image(str(c.get("image", ""))):
                self.report.fail(cw, problem)
            if not str(c.get("image", "")).startswith("engram"):
                continue
            cmd = self._container(doc, role, spec, c=c, cw=cw, labels=labels)
            if cmd is not None:
                cmds[c["name"]] = cmd
        return cmds

    def _container(self, doc: dict, role: str, spec: dict, *, c: dict, cw: str, labels: dict) -> Cmd | None:
        env = {e["name"]: e for e in c.get("env") or []}
        names = list(env)
        for src in c.get("envFrom") or []:
            ref = (src.get("configMapRef") or {}).get("name")
            if ref in self.configmaps:
                names += list(self.configmaps[ref])
            elif ref and not (src.get("configMapRef") or {}).get("optional"):
                self.report.fail(cw, f"envFrom configMap {ref}: no such ConfigMap in the rendering")
        argv = [str(a) for a in c.get("args") or []]
        refs = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(argv)))
        for ref in sorted(refs - set(env)):
            self.report.fail(
                cw,
                f"args reference $({ref}) but the container defines no env {ref} (Kubernetes would pass it literally)",
            )
        self.checker.env(names, cw, used_in_args=refs)
        command = [str(a) for a in c.get("command") or []]
        if (command and command not in SHELLS) or role.startswith("ray") or role == "submitter":
            return None  # another program, or a Ray node that KubeRay starts
        argvs = shell_engram_argvs(" ".join(argv)) if command else [argv]
        parsed = [
            self.checker.engram([self._expand(a, env, doc) for a in one], cw, self._files(spec, c)) for one in argvs
        ]
        cmd = next((p for p in parsed if p is not None), None)
        if cmd is None:
            return None
        ports = {p["containerPort"] for p in c.get("ports") or []}
        for label, port in (("--port", cmd.port), ("--metrics-port", getattr(cmd.args, "metrics_port", None))):
            if port and port not in ports:
                self.report.fail(cw, f"listens on {label} {port} but declares containerPorts {sorted(ports)}")
        if cmd.name == "shard" and cmd.cfg is not None:
            data_port = cmd.cfg.cluster.data_port
            if not data_port:
                self.report.fail(
                    cw,
                    "cluster.data_port is 0 (a random port): no containerPort, Service or "
                    "NetworkPolicy can name the data plane; set a fixed port in engram-config",
                )
            elif data_port not in ports:
                self.report.fail(
                    cw, f"listens on cluster.data_port {data_port} but declares containerPorts {sorted(ports)}"
                )
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_port = ((c.get(probe) or {}).get("grpc") or {}).get("port")
            if grpc_port is not None and grpc_port != cmd.port:
                self.report.fail(cw, f"{probe} checks gRPC port {grpc_port} but the server listens on {cmd.port}")
            if grpc_port is not None and cmd.cfg is not None and cmd.cfg.security.tls_enabled:
                self.report.fail(
                    cw,
                    f"{probe}: kubelet's gRPC probe cannot speak TLS to a TLS server; "
                    "exec `engram health` with the pod's certificate",
                )
            self._exec_probe(c, probe, cmd, cw=cw, spec=spec)
            if cmd.port and c.get(probe) is None and probe != "startupProbe":
                self.report.fail(cw, f"a server without a {probe}")
        if cmd.port and cmd.cfg is not None and not cmd.cfg.security.tls_enabled:
            self.report.fail(
                cw, f"serves plaintext gRPC on {cmd.port}: set security.tls_enabled (docs/transport-security.md)"
            )
        if cmd.name in SHARD_CLIENTS:
            self._check_addresses(cmd, cw)
        return cmd

    def _exec_probe(self, c: dict, probe: str, cmd: Cmd, *, cw: str, spec: dict) -> None:
        """An exec probe running `engram health`: it parses, checks this container's port, and speaks TLS
        exactly when the server does."""
        argv = [str(a) for a in ((c.get(probe) or {}).get("exec") or {}).get("command") or []]
        if argv[:2] != ["engram", "health"]:
            return
        health = self.checker.engram(argv[1:], f"{cw} {probe}", self._files(spec, c))
        if health is None or health.args is None:
            return
        port = host_port(health.args.address)[1]
        if port != cmd.port:
            self.report.fail(cw, f"{probe} checks port {port} but the server listens on {cmd.port}")
        if (
            health.cfg is not None
            and cmd.cfg is not None
            and health.cfg.security.tls_enabled != cmd.cfg.security.tls_enabled
        ):
            self.report.fail(
                cw,
                f"{probe}: the health check's security.tls_enabled is "
                f"{health.cfg.security.tls_enabled}, the server's {cmd.cfg.security.tls_enabled}",
            )

    def _expand(self, arg: str, env: dict, doc: dict) -> str:
        """$(VAR) -> a sample of what Kubernetes would substitute, so the argv parses as it will."""

        def one(m: re.Match) -> str:
            e = env.get(m.group(1)) or {}
            if "value" in e:
                return str(e["value"])
            path = ((e.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath", "")
            if "pod-index" in path:
                return "0"
            if path == "metadata.namespace":
                return doc["metadata"].get("namespace", "default")
            return f"{doc['metadata']['name']}-0"

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)

    def _files(self, spec: dict, c: dict) -> dict[str, str]:
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        files: dict[str, str] = {}
        for m in c.get("volumeMounts") or []:
            cm = (volumes.get(m["name"]) or {}).get("configMap")
            if cm and cm.get("name") in self.configmaps:
                for key, content in self.configmaps[cm["name"]].items():
                    target = m["mountPath"] if m.get("subPath") == key else f"{m['mountPath'].rstrip('/')}/{key}"
                    files[target] = content
        return files

    def _check_addresses(self, cmd: Cmd, cw: str) -> None:
        if cmd.cfg is None:
            return
        host, port = host_port(cmd.cfg.cluster.redis_url, 6379)
        svc = self.services.get(host.split(".")[0])
        if svc is None or port not in {p["port"] for p in svc["spec"].get("ports") or []}:
            self.report.fail(cw, f"cluster.redis_url {cmd.cfg.cluster.redis_url}: no Service {host} with port {port}")

    def _rayjob(self, doc: dict) -> None:
        where, spec = self.where(doc), doc["spec"]
        argv = shlex.split(spec.get("entrypoint", ""))
        if argv[:1] != ["engram"]:
            self.report.fail(where, f"entrypoint {spec.get('entrypoint')!r}: expected `engram train ...`")
            return
        head = spec["rayClusterSpec"]["headGroupSpec"]
        h_spec = head["template"]["spec"]
        cmd = self.checker.engram(argv[1:], f"{where} entrypoint", self._files(h_spec, h_spec["containers"][0]))
        groups = [("head", head)] + [
            (g.get("groupName"), g) for g in spec["rayClusterSpec"].get("workerGroupSpecs") or []
        ]
        for name, group in groups:
            params = [f"--{k}={v}" for k, v in (group.get("rayStartParams") or {}).items()]
            self.checker.ray(["start", *params], f"{where} {name} rayStartParams")
        if cmd is not None and cmd.cfg is not None:
            self._check_addresses(cmd, f"{where} entrypoint")
            self.train_cfg = cmd.cfg
            if cmd.cfg.dist.use_gpu:
                gpus = sum(
                    int(g.get("replicas", 1))
                    * int(
                        quantity(
                            ((g["template"]["spec"]["containers"][0].get("resources") or {}).get("limits") or {}).get(
                                "nvidia.com/gpu", 0
                            )
                        )
                    )
                    for _, g in groups[1:]
                )
                if gpus < cmd.cfg.dist.num_workers:
                    self.report.fail(
                        where,
                        f"dist.use_gpu with dist.num_workers={cmd.cfg.dist.num_workers} but the "
                        f"worker groups hold {gpus} nvidia.com/gpu",
                    )

    def _selected(
        self, selector: dict, *, label_selector: bool = False
    ) -> list[tuple[str, dict, str, dict, dict[str, Cmd]]]:
        match = selector_matches if label_selector else labels_match
        return [p for p in self.pods if match(selector, (p[3].get("metadata") or {}).get("labels") or {})]

    def _services(self) -> None:
        for svc in self.services.values():
            where = self.where(svc)
            pods = self._selected(svc["spec"].get("selector") or {})
            if not pods:
                self.report.fail(where, "selects no pod template in the rendering")
                continue
            containers = [c for p in pods for c in p[3]["spec"].get("containers") or []]
            known = {p.get("name") for c in containers for p in c.get("ports") or []}
            known |= {p["containerPort"] for c in containers for p in c.get("ports") or []}
            for port in svc["spec"].get("ports") or []:
                target = port.get("targetPort", port["port"])
                if target not in known:
                    self.report.fail(
                        where, f"port {port['port']} targets {target!r}, which no selected container declares"
                    )

    def _network_policies(self) -> None:
        clients = [
            p
            for p in self.pods
            if any(c.name in SHARD_CLIENTS and c.cfg is not None for c in p[4].values()) or p[2].startswith("ray-")
        ]
        for np in (d for d in self.docs if d["kind"] == "NetworkPolicy"):
            where = self.where(np)
            pods = self._selected(np["spec"].get("podSelector") or {}, label_selector=True)
            if not pods:
                self.report.fail(where, "podSelector selects no pod template in the rendering")
                continue
            ports = {
                p["containerPort"] for pod in pods for c in pod[3]["spec"]["containers"] for p in c.get("ports") or []
            }
            shard = next((c for pod in pods for c in pod[4].values() if c.name == "shard"), None)
            # the gRPC port and the TCP data plane's: every shard client dials both
            shard_ports = (
                []
                if shard is None
                else [shard.port]
                + ([shard.cfg.cluster.data_port] if shard.cfg is not None and shard.cfg.cluster.data_port else [])
            )
            admitted: dict[int, list[dict]] = {port: [] for port in shard_ports}
            for rule in np["spec"].get("ingress") or []:
                rule_ports = {p.get("port") for p in rule.get("ports") or []}
                for port in rule_ports - ports:
                    self.report.fail(where, f"ingress port {port} is not a containerPort of the selected pods")
                for port in admitted:
                    if port in rule_ports:
                        admitted[port] += [
                            peer["podSelector"].get("matchLabels") or {}
                            for peer in rule.get("from") or []
                            if "podSelector" in peer and "namespaceSelector" not in peer
                        ]
            for port, selectors in admitted.items():
                for pw, _doc, _role, template, _cmds in clients:
                    labels = (template.get("metadata") or {}).get("labels") or {}
                    if not any(labels_match(sel, labels) for sel in selectors):
                        self.report.fail(where, f"{pw} talks to the shards but no ingress rule admits it on {port}")

    def _cluster(self) -> None:
        init = next((c for p in self.pods for c in p[4].values() if c.name == "cluster" and c.cfg is not None), None)
        train = getattr(self, "train_cfg", None)
        for pw, doc, _role, template, cmds in self.pods:
            for name, cmd in cmds.items():
                if cmd.name == "shard" and doc["kind"] == "StatefulSet" and init is not None:
                    self._shards(pw, doc, template, name=name, cmd=cmd, cfg=init.cfg)
                checkpoint = getattr(cmd.args, "checkpoint", None) if cmd.args else None
                if checkpoint and train is not None and checkpoint != f"{train.train.out_dir}/checkpoint.pt":
                    self.report.fail(
                        pw, f"--checkpoint {checkpoint}, but the RayJob writes {train.train.out_dir}/checkpoint.pt"
                    )

    def _shards(self, pw: str, doc: dict, template: dict, *, name: str, cmd: Cmd, cfg: Any) -> None:
        spec = doc["spec"]
        if spec.get("replicas", 1) != cfg.cluster.num_shards:
            self.report.fail(
                pw,
                f"replicas {spec.get('replicas', 1)} != cluster.num_shards={cfg.cluster.num_shards} "
                "that cluster init stores",
            )
        svc = self.services.get(spec.get("serviceName", ""))
        if svc is None or svc["spec"].get("clusterIP") != "None":
            self.report.fail(pw, f"serviceName {spec.get('serviceName')!r}: needs a headless Service (clusterIP: None)")
        elif f".{spec['serviceName']}." not in (advertise := getattr(cmd.args, "advertise", None) or ""):
            self.report.fail(pw, f"--advertise {advertise!r}: not the pod's DNS name under {spec['serviceName']}")
        container = next(c for c in template["spec"]["containers"] if c["name"] == name)
        need = table_bytes_per_shard(cfg) + PROCESS_OVERHEAD
        have = quantity(((container.get("resources") or {}).get("requests") or {}).get("memory", 0))
        if have < need:
            self.report.fail(
                pw,
                f"memory request {have / 2**20:.0f} MiB < tables + process "
                f"{need / 2**20:.0f} MiB for this layout and {cfg.cluster.num_shards} shards",
            )
