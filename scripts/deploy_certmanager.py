"""The shape of cert-manager's Certificate and Issuer (cert-manager.io/v1), for offline validation.

No cert-manager CRD ships with the shared schemas, so this is a strict JSON schema of the
fields these manifests may use, written from cert-manager's v1 API reference (field names,
types and enums as the CRDs define them); unknown fields fail, as the API server's strict
field validation would. Used by validate_k8s.py and tests/test_deploy_validation.py.
"""

from __future__ import annotations

from typing import Any

import jsonschema

_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"const": "cert-manager.io"},
    },
}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_USAGES = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
]
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}

CERTIFICATE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "issuerRef": _REF,
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": _STRINGS,
                "uris": _STRINGS,
                "ipAddresses": _STRINGS,
                "emailAddresses": _STRINGS,
                "isCA": {"type": "boolean"},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "usages": {"type": "array", "items": {"enum": _USAGES}},
                "revisionHistoryLimit": {"type": "integer", "minimum": 1},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "subject": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        k: _STRINGS
                        for k in (
                            "organizations",
                            "organizationalUnits",
                            "countries",
                            "localities",
                            "provinces",
                            "streetAddresses",
                            "postalCodes",
                        )
                    },
                },
            },
        },
    },
}

ISSUER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "metadata": _META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "selfSigned": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"crlDistributionPoints": _STRINGS},
                },
                "ca": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["secretName"],
                    "properties": {
                        "secretName": {"type": "string", "minLength": 1},
                        "crlDistributionPoints": _STRINGS,
                        "ocspServers": _STRINGS,
                    },
                },
            },
        },
    },
}

KINDS = {"Certificate": CERTIFICATE, "Issuer": ISSUER, "ClusterIssuer": ISSUER}


def is_cert_manager(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).startswith("cert-manager.io/")


def problems(doc: dict[str, Any]) -> list[str]:
    schema = KINDS.get(str(doc.get("kind")))
    if schema is None:
        return [f"cert-manager kind {doc.get('kind')!r} has no schema here (Certificate, Issuer, ClusterIssuer)"]
    return [
        f"cert-manager {doc['kind']} schema at {'/'.join(str(p) for p in e.absolute_path) or '(top level)'}: "
        f"{e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]


def tls_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every Secret a pod mounts as `engram-*-tls` is filled by a Certificate, and Issuers named exist."""
    certs = {(d.get("spec") or {}).get("secretName"): d for d in docs if d.get("kind") == "Certificate"}
    issuers = {(d.get("metadata") or {}).get("name") for d in docs if d.get("kind") in ("Issuer", "ClusterIssuer")}
    out = []
    for c in certs.values():
        spec, name = c.get("spec") or {}, (c.get("metadata") or {}).get("name")
        issuer = (spec.get("issuerRef") or {}).get("name")
        if issuer not in issuers:
            out.append(f"Certificate/{name}: issuer {issuer} is not defined")
        for uri in spec.get("uris") or []:
            if uri.startswith("engram-role:") and uri.split(":", 1)[1] not in ("read", "train", "admin"):
                out.append(f"Certificate/{name}: unknown role in {uri}")
    for d in docs:
        for vol in _volumes(d):
            name = (vol.get("secret") or {}).get("secretName", "")
            if name.startswith("engram-") and name.endswith("-tls") and certs and name not in certs:
                out.append(f"{d['kind']}/{d['metadata']['name']}: mounts Secret {name}, which no Certificate fills")
    return out


def _volumes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            vols = node.get("volumes")
            if isinstance(vols, list):
                out.extend(v for v in vols if isinstance(v, dict))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc.get("spec"))
    return out
