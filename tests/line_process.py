"""A child process whose stdout lines tests wait on (READY lines, progress), stderr kept for errors."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class LineProcess:
    name = "process"  # used in error messages
    kill_on_timeout = False

    def __init__(self, cmd: list[str], *, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []  # every stdout line seen by wait_line
        self._q: queue.Queue[str | None] = queue.Queue()
        self._stderr = tempfile.TemporaryFile(mode="w+b")

    def launch(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_line(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                if self.kill_on_timeout:
                    self.kill()
                raise TimeoutError(
                    f"no {prefix!r} line from {self.name} in {timeout_s} s; stderr:\n{self.stderr()}"
                ) from None
            if line is None:
                rc = self.proc.wait() if self.proc else None
                raise RuntimeError(f"{self.name} exited ({rc}) before {prefix!r}; stderr:\n{self.stderr()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def terminate(self, timeout_s: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
