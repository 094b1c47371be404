"""Shared helpers for integration tests: a real redis-server and real shard processes.

Import the fixtures you need into a test module (`from tests.fixtures_cluster import
redis_server`); every process started here is killed in teardown.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engram.config import SecurityConfig
from tests import fixtures_tls
from tests.line_process import LineProcess

ROOT = Path(__file__).resolve().parents[1]
REDIS_BIN = (
    shutil.which("redis-server")
    or shutil.which("redis-server", path=str(Path(sys.executable).parent))
    or "/usr/bin/redis-server"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on a loopback port; stop/start keeps the port (and `data_dir`).

    No persistence, unless `data_dir` is given: then AOF there (appendonly yes, appendfsync everysec).
    `secure` (the default, as `engram up`): a random password (requirepass, in a 0600 config file)
    and a cluster key signing the control plane's entries; `overrides` hands both to a process as
    `security.*` file paths and `control(namespace)` connects with them.
    """

    def __init__(self, port: int | None = None, *, data_dir: Path | None = None, secure: bool = True) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.secrets: dict[str, Path] = {}
        if secure:
            from services.control.security import new_secret, write_secret

            folder = Path(tempfile.mkdtemp(prefix="engram-test-redis-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            self.secrets = {
                "redis_password_file": write_secret(folder / "redis-password", new_secret()),
                "cluster_key_file": write_secret(folder / "cluster-key", new_secret()),
            }
            write_secret(folder / "redis.conf", b'requirepass "' + self.password.encode() + b'"\n')

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def password(self) -> str | None:
        f = self.secrets.get("redis_password_file")
        return f.read_text() if f is not None else None

    @property
    def overrides(self) -> list[str]:
        """`--set` values (without the flag) for a process of this control plane: its URL and secrets."""
        return [f"cluster.redis_url={self.url}", *(f"security.{k}={v}" for k, v in sorted(self.secrets.items()))]

    def control(self, namespace: str, **kw: Any) -> Any:
        """`ControlPlane.connect` to this Redis with its password and cluster key."""
        from services.control import ControlPlane
        from services.control.security import Signer

        key = self.secrets.get("cluster_key_file")
        signer = Signer.from_file(str(key)) if key is not None else None
        return ControlPlane.connect(self.url, namespace, password=self.password, signer=signer, **kw)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        conf = [str(self.secrets["redis_password_file"].with_name("redis.conf"))] if self.secrets else []
        cmd = [REDIS_BIN, *conf, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        hello = (b"AUTH " + self.password.encode() + b"\r\n" if self.password else b"") + b"PING\r\n"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(hello)
                    reply = b""
                    for _ in range(3):  # "+OK" and "+PONG" may come in two reads
                        reply += s.recv(64)
                        if b"+PONG" in reply or b"-" in reply:
                            break
                    if b"+PONG" in reply:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


class ShardProcess(LineProcess):
    """`python -m services.shard ...` as a child process; `start()` waits for its READY line.

    With `tls` (the default) the shard serves mTLS with roles on, as the session's "shard"
    identity (tests/fixtures_tls.py); `channel(role)` dials it as that role. `args` come after
    the identity's `--set`s, so a test's own `security.*` values win."""

    name = "shard"
    kill_on_timeout = True

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, tls: bool = True) -> None:
        ident = fixtures_tls.sets("shard") if tls else []
        super().__init__([sys.executable, "-m", "services.shard", *ident, *args], env=env)
        self.args = args
        self.tls = tls
        self.address = ""
        self.shard_id = -1

    def start(self, timeout_s: float = 60.0) -> ShardProcess:
        self.launch()
        return self.wait_ready(timeout_s)

    def channel(self, role: str = "admin", options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """A sync channel to this shard as `role` (plaintext when the shard runs without TLS)."""
        if not self.tls:
            return grpc.insecure_channel(self.address, options=options)
        return fixtures_tls.channel(self.address, role, options)

    def security(self, role: str = "admin") -> SecurityConfig:
        return fixtures_tls.security(role) if self.tls else SecurityConfig()

    def wait_ready(self, timeout_s: float = 60.0) -> ShardProcess:
        line = self.wait_line("READY ", timeout_s)
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        self.shard_id, self.address = int(fields["shard"]), fields["address"]
        return self


def start_all(procs: list[ShardProcess], timeout_s: float = 60.0) -> list[ShardProcess]:
    """Start several shards at once (boots overlap), then wait for each READY line."""
    for p in procs:
        p.launch()
    for p in procs:
        p.wait_ready(timeout_s)
    return procs


@pytest.fixture
def shard_procs() -> Iterator[list[ShardProcess]]:
    """Append ShardProcess objects to the yielded list; all are killed at teardown."""
    procs: list[ShardProcess] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()


def run_shard_to_exit(args: list[str], timeout_s: float = 60.0, *, tls: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m services.shard` expecting it to exit on bad configuration (it never serves, so
    no identity by default: the cases check the configuration the test gives; `tls` adds ShardProcess's)."""
    ident = fixtures_tls.sets("shard") if tls else []
    return subprocess.run(
        [sys.executable, "-m", "services.shard", *ident, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
