"""Test helpers for the model worker: a tiny trained checkpoint and `engram serve` as a process."""

from __future__ import annotations

import atexit
import functools
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def shared_tiny_checkpoint() -> Path:
    """One tiny checkpoint per test process (the server and remote tests share it)."""
    tmp = Path(tempfile.mkdtemp(prefix="engram-worker-test-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return train_tiny_checkpoint(tmp)


def train_tiny_checkpoint(tmp: Path, *extra: str) -> Path:
    """A few-second tiny-preset training run on a corpus written here; -> checkpoint path."""
    from engram.config import load_config
    from trainer.local import train_local

    text = "\n".join(
        f"def function_{i % 17}(self, value):\n    return value * {i % 5} + self.offset_{i % 3}\n" for i in range(300)
    )
    (tmp / "corpus.txt").write_text(text)
    cfg = load_config("tiny", None, [
        f"train.corpus=[\"{tmp / 'corpus.txt'}\"]", f"tokenizer.cache_dir={tmp / 'cache'}",
        f"train.out_dir={tmp / 'run'}", "train.progress=false", "train.steps=8", "train.eval_every=8",
        "train.warmup_steps=2", *extra,
    ])
    return Path(train_local(cfg).checkpoint)


class WorkerProcess:
    """`engram serve` as a child process; `start()` waits for its READY line."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        self.cmd = [sys.executable, "-m", "engram_cli.main", "serve", "--checkpoint", str(checkpoint), "--port", "0", *args]
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._stderr = tempfile.TemporaryFile(mode="w+b")

    def start(self, timeout_s: float = 60.0) -> WorkerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        threading.Thread(target=self._pump, daemon=True).start()
        line = self.wait_line("READY ", timeout_s)
        self.address = dict(p.split("=", 1) for p in line.split()[1:])["address"]
        return self

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
                raise TimeoutError(f"no {prefix!r} line in {timeout_s}s; stderr:\n{self.stderr()}") from None
            if line is None:
                raise RuntimeError(f"worker exited before {prefix!r}; stderr:\n{self.stderr()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
