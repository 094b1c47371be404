"""Roles and which RPC needs which.

Three roles, each including the ones below it: read < train < admin. A caller's role comes
from its mTLS client certificate (a SAN URI `engram-role:<role>`) or, without one, from a
bearer token (`authorization: Bearer <token>` metadata) listed in the server's tokens file.
An RPC not listed here needs admin (new mutating RPCs are closed by default).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from engram.config import ConfigError

ROLES = ("read", "train", "admin")
RANK = {r: i for i, r in enumerate(ROLES)}
ROLE_URI_PREFIX = "engram-role:"
_SHARD = "/engram.shard.v1.MemoryShard/"
_WORKER = "/engram.worker.v1.ModelWorker/"
METHOD_ROLES = {
    _SHARD + "Lookup": "read",
    _SHARD + "Stats": "read",
    "/grpc.health.v1.Health/Check": "read",
    "/grpc.health.v1.Health/Watch": "read",
    _WORKER + "Score": "read",
    _WORKER + "Generate": "read",
    _SHARD + "ApplyGradients": "train",
    # the trainer's rank 0 checkpoints mid-run and restores on --resume (trainer/ray_worker.py): both
    # take a name under the shard's checkpoint root, and a restore only files that verify against
    # their sha256. A train client can move every row through the optimizer anyway; rolling the
    # tables back to one of the cluster's own checkpoints gives it no more than that.
    _SHARD + "Checkpoint": "train",
    _SHARD + "Restore": "train",
    _SHARD + "MigrateSlots": "admin",
    _SHARD + "ImportSlots": "admin",
    _SHARD + "SetSlotMap": "admin",
}


def required_role(method: str) -> str:
    return METHOD_ROLES.get(method, "admin")


def allows(role: str | None, need: str) -> bool:
    return role is not None and RANK.get(role, -1) >= RANK[need]


def strongest(roles: Iterable[str]) -> str | None:
    known = [r for r in roles if r in RANK]
    return max(known, key=RANK.__getitem__) if known else None


def roles_from_uris(uris: Iterable[str]) -> str | None:
    """SAN URIs of a certificate -> the strongest `engram-role:<role>` among them (None: no role)."""
    return strongest(u[len(ROLE_URI_PREFIX) :] for u in uris if u.startswith(ROLE_URI_PREFIX))


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    """The server's accepted bearer tokens: a file of `<role> <token>` lines ('#' comments).

    Re-read when the file changes (checked at most once a second), so tokens rotate without a
    restart. Tokens are kept as SHA-256 digests; a dictionary lookup on a digest leaks nothing
    useful through timing.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._by_digest: dict[bytes, str] = {}
        self._mtime_ns = -1
        self._checked = 0.0
        self.reload(force=True)

    def reload(self, *, force: bool = False, now: float = 0.0) -> None:
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as exc:
            if force:
                raise ConfigError(f"security.tokens_file: cannot read {self.path}: {exc.strerror}") from None
            return  # keep the last good set while a rotation replaces the file
        if mtime == self._mtime_ns:
            return
        self._by_digest = parse_tokens(self.path.read_text(), source=str(self.path))
        self._mtime_ns = mtime

    def role(self, token: str) -> str | None:
        return self._by_digest.get(_digest(token))


def parse_tokens(text: str, *, source: str) -> dict[bytes, str]:
    out: dict[bytes, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, _, token = line.partition(" ")
        token = token.strip()
        if role not in RANK or not token:
            raise ConfigError(
                f"security.tokens_file: {source} line {n}: expected '<role> <token>' with role one of "
                f"{', '.join(ROLES)} (the line is not shown: it may hold a secret)"
            )
        if len(token) < 16:
            raise ConfigError(f"security.tokens_file: {source} line {n}: token shorter than 16 characters")
        out[_digest(token)] = role
    return out


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None
