"""Addresses in deployment text (URLs, host:port) and whether a NetworkPolicy admits a dialling pod."""

from __future__ import annotations

import ipaddress
import re

from deploy_common import selector_matches

SCHEME_PORTS = {"redis": 6379, "rediss": 6379, "http": 80, "https": 443, "grpc": 443, "ray": 10001}
URL_RE = re.compile(r"\b([a-z][a-z0-9+.-]*)://([A-Za-z0-9_.-]+)(?::(\d+))?")
HOSTPORT_RE = re.compile(r"(?<![\w./:@-])([A-Za-z0-9][A-Za-z0-9.-]*):(\d{2,5})\b")
VAR_RE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
LOCAL = {"localhost", "0.0.0.0", "::", "::1"}


def addresses(text: str) -> list[tuple[str, str | None, int | None]]:
    """(host, scheme or None, port or None) of every URL and host:port in `text`."""
    out: list[tuple[str, str | None, int | None]] = []
    for m in URL_RE.finditer(text):
        out.append((m.group(2), m.group(1), int(m.group(3)) if m.group(3) else SCHEME_PORTS.get(m.group(1))))
    for m in HOSTPORT_RE.finditer(URL_RE.sub(" ", text)):
        out.append((m.group(1), None, int(m.group(2))))
    return out


def is_local(host: str) -> bool:
    if host in LOCAL:
        return True
    try:
        ipaddress.ip_address(host)
        return True  # a literal IP: nothing to resolve (loopback, or outside what the manifests define)
    except ValueError:
        return False


def port_number(tpl: dict, target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    for c in (tpl.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def admits(
    policy: dict, src_labels: dict, *, src_ns_labels: dict | None, port: int | None, same_namespace: bool = True
) -> bool:
    """Does one of the policy's ingress rules let a pod (labels, its namespace's labels) in on `port`?

    src_ns_labels None = the namespace's labels are unknown: a namespaceSelector admits it only when
    it selects every namespace ({})."""
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports") or []
        if ports and not any(p.get("port") in (port, None) for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True  # no `from`: every source
        for peer in peers:
            if "ipBlock" in peer:
                continue
            pod_ok = selector_matches(peer.get("podSelector"), src_labels) if "podSelector" in peer else True
            if "namespaceSelector" in peer:
                ns_sel = peer["namespaceSelector"] or {}
                ns_ok = (not ns_sel) or (src_ns_labels is not None and selector_matches(ns_sel, src_ns_labels))
            else:
                ns_ok = same_namespace
            if pod_ok and ns_ok:
                return True
    return False
