"""How the launcher starts child processes: no gRPC fork handlers in the child, and children
still die with their parent.

A restarted shard once aborted before exec ("epoll_wait error: Bad file descriptor", exit -6)
because `preexec_fn` made Python fork() and gRPC's fork handlers restarted its poller in the
child (grpc/grpc#43055). These tests run real parent and child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.fixtures_procs import ROOT, pid_alive, wait_gone

# A parent with busy gRPC client threads (as the benchmarks and tests are) that spawns children
# the launcher's way and prints how many exited non-zero. gRPC's core prints a fork_posix line
# from its pre-fork handler whenever a fork() runs it.
_BUSY_PARENT = textwrap.dedent(
    """
    import threading
    from concurrent import futures
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from services.launcher.processes import spawn as _spawn

    server = grpc.server(futures.ThreadPoolExecutor(4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()

    def hammer():
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        while not stop.is_set():
            stub.Check(health_pb2.HealthCheckRequest())

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    bad = sum(_spawn(["/bin/true"]).wait() != 0 for _ in range(40))
    stop.set()
    for t in threads:
        t.join()
    server.stop(None)
    print("NONZERO", bad, flush=True)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="fork handlers and PDEATHSIG are Linux behaviour")
def test_spawn_runs_no_grpc_fork_handlers_in_a_busy_grpc_process() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _BUSY_PARENT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert "NONZERO 0" in out.stdout, out.stdout + out.stderr
    assert "fork_posix" not in out.stderr, "gRPC fork handlers ran: a child was fork()ed, not vfork()ed"


# A parent that spawns a long sleeper the launcher's way, prints its pid, then waits to be killed.
_PARENT = textwrap.dedent(
    """
    import time
    from services.launcher.processes import spawn as _spawn

    child = _spawn(["sleep", "60"])
    print("CHILD", child.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="PDEATHSIG is Linux behaviour")
def test_spawned_child_dies_with_its_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.startswith("CHILD "), line
        child = int(line.split()[1])
        time.sleep(0.3)  # setpriv has exec'd sleep by now
        assert pid_alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert not wait_gone([child], 10), f"child {child} outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
