"""Redis credentials for the control plane (real redis-server processes): an ACL user, and rediss://."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from engram.config import load_config
from services.control import ControlPlane, ControlPlaneUnavailable
from services.control.security import write_secret
from services.launcher import free_port, stop_process

pytestmark = pytest.mark.timeout(60)


def _redis(conf: str, tmp: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    assert binary is not None
    path = write_secret(tmp / "redis.conf", conf.encode())
    proc = subprocess.Popen([binary, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    assert proc.poll() is None, "redis-server did not start"
    return proc


async def _ping(cp: ControlPlane, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                await cp.ping()
                return
            except ControlPlaneUnavailable as exc:
                if "Connection refused" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await cp.close()


def test_acl_user_from_config_files(tmp_path: Path) -> None:
    port = free_port()
    proc = _redis(
        f'port {port}\nbind 127.0.0.1\nsave ""\nuser default off\nuser engram on >s3cret-pw ~engram:* +@all\n', tmp_path
    )
    try:
        write_secret(tmp_path / "pw", b"s3cret-pw\n")
        cfg = load_config(
            "tiny",
            overrides=[
                f"cluster.redis_url=redis://127.0.0.1:{port}/0",
                "security.redis_username=engram",
                f"security.redis_password_file={tmp_path / 'pw'}",
            ],
        )
        asyncio.run(_ping(ControlPlane.from_config(cfg)))
        for user, pw in ((None, None), (None, "s3cret-pw"), ("engram", "wrong")):
            with pytest.raises(ControlPlaneUnavailable, match="unreachable while pinging"):
                asyncio.run(
                    _ping(
                        ControlPlane.connect(
                            f"redis://127.0.0.1:{port}/0", "engram", username=user, password=pw, retries=0
                        )
                    )
                )
    finally:
        stop_process(proc, grace_s=5)


def _tls_files(tmp: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "engram-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    skey = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(name)
        .public_key(skey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    write_secret(key_path, skey.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def test_rediss_with_a_ca_file(tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    port = free_port()
    proc = _redis(
        f'port 0\ntls-port {port}\nbind 127.0.0.1\nsave ""\ntls-cert-file {cert}\ntls-key-file {key}\n'
        f"tls-ca-cert-file {ca}\ntls-auth-clients no\nrequirepass tls-pw\n",
        tmp_path,
    )
    try:
        write_secret(tmp_path / "pw", b"tls-pw")
        url = f"rediss://127.0.0.1:{port}/0"
        cfg = load_config(
            "tiny",
            overrides=[
                f"cluster.redis_url={url}",
                f"security.redis_ca_file={ca}",
                f"security.redis_password_file={tmp_path / 'pw'}",
            ],
        )
        asyncio.run(_ping(ControlPlane.from_config(cfg)))
        with pytest.raises(ControlPlaneUnavailable, match="unreachable while pinging"):  # an unknown CA
            asyncio.run(_ping(ControlPlane.connect(url, "engram", password="tls-pw", retries=0)))
        with pytest.raises(ControlPlaneUnavailable):  # plaintext to a TLS port
            asyncio.run(
                _ping(
                    ControlPlane.connect(
                        f"redis://127.0.0.1:{port}/0", "engram", password="tls-pw", retries=0, timeout_s=1
                    )
                )
            )
        with pytest.raises(ValueError, match="not a rediss:// URL"):
            ControlPlane.connect(f"redis://127.0.0.1:{port}/0", "engram", ca_file=str(ca))
    finally:
        stop_process(proc, grace_s=5)
