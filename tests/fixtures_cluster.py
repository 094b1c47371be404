"""Shared helpers for integration tests: a real redis-server and real shard processes.

Import the fixtures you need into a test module (`from tests.fixtures_cluster import
redis_server`); every process started here is killed in teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    """

    def __init__(self, port: int | None = None, *, data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        cmd = [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            cmd += ["--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
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
    """`python -m services.shard ...` as a child process; `start()` waits for its READY line."""

    name = "shard"
    kill_on_timeout = True

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None) -> None:
        super().__init__([sys.executable, "-m", "services.shard", *args], env=env)
        self.args = args
        self.address = ""
        self.shard_id = -1

    def start(self, timeout_s: float = 60.0) -> ShardProcess:
        self.launch()
        return self.wait_ready(timeout_s)

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


def run_shard_to_exit(args: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """Run `python -m services.shard` expecting it to exit (bad configuration paths)."""
    return subprocess.run(
        [sys.executable, "-m", "services.shard", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
