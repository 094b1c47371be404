"""One `python -m services.shard` child of a local cluster: its READY line and health SERVING."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.config import SecurityConfig
from services.launcher.processes import LauncherError, spawn, stop_process

ROOT = Path(__file__).resolve().parents[2]


class ShardProcess:
    """One `python -m services.shard` child; `wait_ready()` parses its READY line."""

    def __init__(
        self,
        shard_id: int,
        cmd: list[str],
        *,
        log_path: Path,
        env: dict[str, str],
        security: SecurityConfig | None = None,
    ) -> None:
        self.shard_id, self.cmd, self.log_path = shard_id, cmd, log_path
        self.security = security or SecurityConfig()  # how the launcher itself checks the shard's health
        self.address = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        with open(log_path, "ab") as log:
            self.proc = spawn(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
            )
        threading.Thread(target=self._pump, daemon=True, name=f"shard{shard_id}-stdout").start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise LauncherError(
                    f"shard {self.shard_id} printed no READY line in {timeout_s:.0f} s; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                ) from None
            if line is None:
                raise LauncherError(
                    f"shard {self.shard_id} exited with code {self.proc.wait()} before READY; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            if line.startswith("READY "):
                fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
                self.address = fields["address"]
                return self.address

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        from services.security.tls import sync_channel

        with sync_channel(self.address, self.security) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise LauncherError(
                        f"shard {self.shard_id} at {self.address} is not SERVING; log:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def stop(self, grace_s: float = 10.0) -> int | None:
        return stop_process(self.proc, grace_s=grace_s)
