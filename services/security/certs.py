"""Throwaway certificates for a local cluster (`engram up --tls`, the tests): one CA, one cert per role.

Every certificate is both a server and a client certificate (shards dial each other to migrate
slots), carries its role as a SAN URI `engram-role:<role>`, and names localhost, 127.0.0.1, ::1,
the given hosts and `engram-shard` (the name clients check when `security.server_name` is set).
EC P-256 keys: generated in milliseconds. Keys are written 0600 in a 0700 folder.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.security.roles import ROLE_URI_PREFIX

SERVER_NAME = "engram-shard"
# who gets which role: shards are admin (they import each other's slots); CLI admin; trainer train; workers read
IDENTITIES = {"shard": "admin", "admin": "admin", "train": "train", "read": "read"}


@dataclass(frozen=True, slots=True)
class Issued:
    cert: Path
    key: Path
    ca: Path


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "engram"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def make_ca(
    *, common_name: str = "engram throwaway CA", days: float = 30
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    name: str,
    role: str | None,
    hosts: list[str] | tuple[str, ...] = (),
    days: float = 30,
    not_before: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate for `name` with `role` (None: no role) valid from `not_before` for `days`."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    alt: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(SERVER_NAME)]
    alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    for h in hosts:
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(h))
        except ValueError:
            general = x509.DNSName(h)
        if general not in alt:
            alt.append(general)
    if role is not None:
        alt.append(x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def write_pair(
    folder: Path, stem: str, *, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}-key.pem"
    _write(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def write_bundle(folder: str | Path, *, hosts: list[str] | tuple[str, ...] = (), days: float = 30) -> dict[str, Issued]:
    """A CA and one certificate per identity (IDENTITIES) in `folder` -> identity -> paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    ca_key, ca_cert = make_ca(days=days)
    ca_path, _ = write_pair(out, "ca", key=ca_key, cert=ca_cert)
    issued = {}
    for ident, role in IDENTITIES.items():
        key, cert = issue(ca_key, ca_cert, name=f"engram-{ident}", role=role, hosts=hosts, days=days)
        c, k = write_pair(out, ident, key=key, cert=cert)
        issued[ident] = Issued(cert=c, key=k, ca=ca_path)
    return issued


def overrides(issued: Issued, *, auth: bool = True) -> list[str]:
    """`--set` values that give a process this identity."""
    return [
        "security.tls_enabled=true",
        f"security.tls_cert={issued.cert}",
        f"security.tls_key={issued.key}",
        f"security.tls_ca={issued.ca}",
        f"security.auth_enabled={'true' if auth else 'false'}",
    ]


def load_ca(folder: str | Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA `write_bundle` left in `folder` (ca.pem, ca-key.pem): to issue more certificates from it."""
    out = Path(folder)
    key = serialization.load_pem_private_key((out / "ca-key.pem").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{out / 'ca-key.pem'}: not an EC key")
    return key, x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
