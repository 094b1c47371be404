"""Table files of a killed shard: swept by the next shard of that name, or by `sweep_dead_tables`;
files of a live writer, or without a table header, are left alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from services.shard.shm_table import H_PID, H_RETIRED, HEADER_WORDS, TableMemory, sweep_dead_tables

WRITER = """
import secrets, sys, time
import numpy as np
from pathlib import Path
from services.shard.shm_table import ShmTable
t = ShmTable(Path(sys.argv[1]), shard_id=0, table=1, rows=4, dim=8, base=np.zeros(2, dtype=np.int64),
             epoch=1, mirror=None, token=secrets.token_bytes(16))
print("ready", flush=True)
time.sleep(60)
"""


def _writer(path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def test_files_of_a_killed_writer_are_swept_and_live_or_foreign_ones_kept(tmp_path) -> None:
    killed, live = _writer(tmp_path / "engram.ns.shard0.t1"), _writer(tmp_path / "engram.ns.shard1.t1")
    try:
        killed.kill()  # SIGKILL: no chance to unlink
        killed.wait(timeout=10)
        (tmp_path / "engram.notes").write_bytes(b"not a table file")  # no table header
        header = np.fromfile(tmp_path / "engram.ns.shard0.t1", dtype="<u8", count=HEADER_WORDS)
        assert int(header[H_PID]) == killed.pid

        held = np.memmap(tmp_path / "engram.ns.shard0.t1", dtype="<u8", mode="r", shape=(HEADER_WORDS,))
        assert sweep_dead_tables(tmp_path, "engram.", headerless=False) == 1
        assert int(held[H_RETIRED]) == 1  # a reader still mapping it sees it retired, reopens by name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["engram.notes", "engram.ns.shard1.t1"]
        assert sweep_dead_tables(tmp_path, "engram.", headerless=False) == 0  # idempotent
    finally:
        live.kill()
        live.wait(timeout=10)
    assert sweep_dead_tables(tmp_path, "engram.ns.", headerless=False) == 1  # now its writer is gone too


def test_a_restarted_shard_replaces_its_killed_predecessors_file(tmp_path) -> None:
    killed = _writer(tmp_path / "engram.ns.shard0.t1")
    killed.kill()
    killed.wait(timeout=10)
    (tmp_path / "engram.ns.shard1.t1").write_bytes(b"")  # another shard's name: not this one's to sweep
    memory = TableMemory(shm_dir=str(tmp_path), namespace="ns", shard_id=0)
    assert memory.shared and memory.reason == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engram.ns.shard1.t1"]
