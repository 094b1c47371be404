"""Control-plane security: Redis credentials from secret files, and signed entries.

Signing (`Signer`): with a cluster key (`security.cluster_key_file`), every value the control
plane writes (layout, slot map, registry records, manifests) is stored as

    b"ES1" + HMAC-SHA256(key, "<redis key>\\0<hash field>\\0" + body) + body      (body: msgpack)

so an entry cannot be forged, edited, or moved to another key or shard id without the key. A
reader with the key refuses an entry whose MAC is wrong or missing (`Tampered`); the control
plane then ignores it, logs one line and counts it (`TamperLog`, metric event
`control_tampered`). A reader without a key takes signed and unsigned entries alike (it cannot
check them). Replaying an older signed entry of the same key is not detected here: epochs
only move forward in every reader (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from services.telemetry import record_shard_event

log = logging.getLogger("engram.control")
MAGIC = b"ES1"
_MAC = hashlib.sha256().digest_size
MIN_KEY_BYTES = 32


class Tampered(ValueError):
    """A control-plane entry whose signature does not verify (or is missing where one is required)."""


def read_secret(path: str, what: str) -> bytes:
    """The bytes of a secret file (one trailing newline dropped); ValueError naming the field if unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    data = data[:-1] if data.endswith(b"\n") else data
    if not data:
        raise ValueError(f"{what}: {path} is empty")
    return data


def write_secret(path: Path, data: bytes) -> Path:
    """Create a secret file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def new_secret() -> bytes:
    """A random secret as printable text (Redis passwords go into a config file as text)."""
    return secrets.token_hex(32).encode()


class Signer:
    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"security.cluster_key_file: the key has {len(key)} bytes, at least {MIN_KEY_BYTES} needed"
            )
        self._key = key

    @classmethod
    def from_file(cls, path: str) -> Signer:
        return cls(read_secret(path, "security.cluster_key_file"))

    def _mac(self, where: str, body: bytes) -> bytes:
        return hmac.new(self._key, where.encode() + b"\0" + body, hashlib.sha256).digest()

    def seal(self, where: str, body: bytes) -> bytes:
        return MAGIC + self._mac(where, body) + body

    def open(self, where: str, data: bytes) -> bytes:
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _MAC:
            raise Tampered(f"{where}: unsigned entry (this cluster signs its entries)")
        mac, body = data[len(MAGIC) : len(MAGIC) + _MAC], data[len(MAGIC) + _MAC :]
        if not hmac.compare_digest(mac, self._mac(where, body)):
            raise Tampered(f"{where}: signature does not verify (edited, forged, or moved from another key)")
        return body


def seal(signer: Signer | None, where: str, body: bytes) -> bytes:
    return body if signer is None else signer.seal(where, body)


def open_entry(signer: Signer | None, where: str, data: bytes) -> bytes:
    """The body of a stored entry; raises Tampered when a signer is set and the entry fails it."""
    if signer is not None:
        return signer.open(where, data)
    if data.startswith(MAGIC) and len(data) >= len(MAGIC) + _MAC:
        return data[len(MAGIC) + _MAC :]  # signed, but this reader has no key to check it
    return data


class TamperLog:
    """One warning line per tampered entry (at most one per key every 10 s) and a count per key."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.counts: dict[str, int] = {}
        self._last: dict[str, float] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def note(self, where: str, exc: Exception, action: str) -> None:
        self.counts[where] = self.counts.get(where, 0) + 1
        record_shard_event("control_tampered")
        now = time.monotonic()
        if now - self._last.get(where, -1e9) >= 10.0:
            self._last[where] = now
            log.warning(
                "control plane at %s: %s; %s (%d so far for this entry)", self.url, exc, action, self.counts[where]
            )
