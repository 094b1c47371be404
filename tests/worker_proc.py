"""Test helpers for the model worker: a tiny trained checkpoint and `engram serve` as a process."""

from __future__ import annotations

import atexit
import functools
import shutil
import sys
import tempfile
from pathlib import Path

import grpc

from tests import fixtures_tls
from tests.corpus import write_code_corpus
from tests.line_process import LineProcess

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

    write_code_corpus(tmp / "corpus.txt", functions=300)
    cfg = load_config(
        "tiny",
        None,
        [
            f'train.corpus=["{tmp / "corpus.txt"}"]',
            f"tokenizer.cache_dir={tmp / 'cache'}",
            f"train.out_dir={tmp / 'run'}",
            "train.progress=false",
            "train.steps=8",
            "train.eval_every=8",
            "train.warmup_steps=2",
            *extra,
        ],
    )
    return Path(train_local(cfg).checkpoint)


class WorkerProcess(LineProcess):
    """`engram serve` as a child process; `start()` waits for its READY line."""

    name = "worker"

    def __init__(self, checkpoint: Path, *args: str, tls: bool = True) -> None:
        """`tls` (the default): the worker's gRPC and HTTP serve mTLS with roles on, as the session's
        "read" identity (tests/fixtures_tls.py); `args` come after it, so a test's own `--set`s win."""
        ident = fixtures_tls.sets("read") if tls else []
        super().__init__(
            [
                *[sys.executable, "-m", "engram_cli.main", "serve", "--checkpoint", str(checkpoint)],
                *["--port", "0", *ident, *args],
            ]
        )
        self.tls = tls
        self.address = ""
        self.http = ""  # host:port of the HTTP API when worker.http_port >= 0
        self.base_url = ""  # http(s)://host:port of the HTTP API (https when the worker has TLS on)

    def start(self, timeout_s: float = 60.0) -> WorkerProcess:
        self.launch()
        line = self.wait_line("READY ", timeout_s)
        fields = dict(p.split("=", 1) for p in line.split()[1:])
        self.address, self.http = fields["address"], fields.get("http", "")
        self.base_url = f"{fields.get('http_scheme', 'http')}://{self.http}" if self.http else ""
        return self

    def channel(self, role: str = "read") -> grpc.Channel:
        """A sync channel to the worker's gRPC as `role` (plaintext when it runs without TLS)."""
        return fixtures_tls.channel(self.address, role) if self.tls else grpc.insecure_channel(self.address)

    def terminate(self, timeout_s: float = 30.0) -> int:
        return super().terminate(timeout_s)
