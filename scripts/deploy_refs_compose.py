"""The docker-compose half of scripts/deploy_refs.py."""

from __future__ import annotations

import re

from deploy_addresses import addresses, is_local
from deploy_common import compose_ports, volume_source
from deploy_rowpaths import compose_row_paths


def _argv_text(value: object) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]  # type: ignore[union-attr, attr-defined]


def check_compose(data: dict, where: str = "docker-compose.yml") -> list[str]:
    problems: list[str] = []
    services = data.get("services") or {}
    top = {key: set(data.get(key) or {}) for key in ("volumes", "configs", "secrets", "networks")}
    for name, svc in services.items():
        sw = f"{where} services.{name}"
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, (dict, list)) else []:
            if dep not in services:
                problems.append(f"{sw}: depends_on {dep}: no such service")
        for v in svc.get("volumes") or []:
            kind, source = volume_source(v)
            if kind == "volume" and source and source not in top["volumes"]:
                problems.append(f"{sw}: volume {source}: not declared under the top-level volumes")
        for key in ("configs", "secrets"):
            for ref in svc.get(key) or []:
                source = ref if isinstance(ref, str) else ref.get("source")
                if source not in top[key]:
                    problems.append(f"{sw}: {key[:-1]} {source}: not declared under the top-level {key}")
        env = svc.get("environment") or {}
        env = dict(item.partition("=")[::2] for item in env) if isinstance(env, list) else env
        texts = [str(v) for v in env.values() if v is not None]
        texts += _argv_text(svc.get("command")) + _argv_text(svc.get("entrypoint"))
        for ref in svc.get("configs") or []:
            source = ref if isinstance(ref, str) else ref.get("source")
            texts.append(str(((data.get("configs") or {}).get(source) or {}).get("content", "")))
        for text in texts:
            for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?+][^}]*)?\}", text):
                if not m.group(2):
                    problems.append(
                        f"{sw}: ${{{m.group(1)}}} has no default: compose substitutes an empty string when it is unset"
                    )
            for host, scheme, port in addresses(text):
                if is_local(host):
                    continue
                address = f"{scheme + '://' if scheme else ''}{host}:{port}"
                if host not in services:
                    problems.append(f"{sw}: dials {address}: no service {host}")
                elif port is None or port not in compose_ports(services[host]):
                    problems.append(
                        f"{sw}: dials {address}: service {host} exposes "
                        f"{sorted(compose_ports(services[host]))} (expose/ports), not {port}"
                    )
    return problems + compose_row_paths(data, where)
