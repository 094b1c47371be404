"""Hostile frames against a real shard process's TCP data plane.

Each case gets an error frame naming what was wrong (or, where the stream cannot be trusted,
an error frame and a closed connection); after recoverable errors the same connection serves
a good request; the shard keeps serving other clients and nothing is written.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from proto.shard.v1 import shard_pb2, shard_pb2_grpc
from services.errors import Reason
from services.frames import REPLY, REPLY_MAGIC, REQUEST, STATUS_OF, WIRE_REASONS, Reply, Request, reason_of_number
from tests.fixtures_cluster import ShardProcess, free_port
from tests.fixtures_procs import expected_rows

DIM = 8  # tiny preset: 16 dims per order, 2 heads
ARGS = [
    "--preset",
    "tiny",
    "--standalone",
    "--shard-id",
    "0",
    "--set",
    "cluster.num_shards=1",
    "--set",
    "cluster.max_message_mb=1",
    "--set",
    "engram.table_size_per_ngram=[4099,4099]",
    "--set",
    "cluster.optimizer=adagrad",
    "--log-level",
    "WARNING",
]
Code = grpc.StatusCode


def start_shard(tmp_path_factory: pytest.TempPathFactory, *overrides: str):
    port = free_port()
    shm = tmp_path_factory.mktemp("shm")
    sets = [a for o in overrides for a in ("--set", o)]
    # plaintext: these cases speak raw frames and half-close TCP (SHUT_WR), which a TLS session
    # cannot; the TLS data plane's refusals are in tests/test_tls_cluster.py
    proc = ShardProcess(
        [*ARGS, "--set", f"cluster.data_port={port}", "--set", f"cluster.shm_dir={shm}", *sets], tls=False
    )
    try:
        proc.start()
        proc.data_port = port
        with grpc.insecure_channel(proc.address) as ch:
            stub = shard_pb2_grpc.MemoryShardStub(ch)
            proc.num_rows = stub.Stats(shard_pb2.StatsRequest(), timeout=10).tables[0].num_rows
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory):
    yield from start_shard(tmp_path_factory)


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory: pytest.TempPathFactory):
    """Replies up to 32 MiB: many chunks of a large reply (2 MiB each, services/shard/dataplane_conn.py)."""
    yield from start_shard(tmp_path_factory, "cluster.max_message_mb=32")


def connect(shard) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", shard.data_port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_reply(s: socket.socket) -> tuple[Reply, bytes]:
    reply = Reply.unpack(recv_exact(s, REPLY.size))
    assert reply.magic == REPLY_MAGIC
    return reply, recv_exact(s, reply.body_len)


def request(
    ids: np.ndarray, *, rid: int = 7, table: int = 1, dtype: int = shard_pb2.FP32, epoch: int = 1, **kw
) -> bytes:
    fields = dict(
        request_id=rid,
        table=table,
        dtype=dtype,
        epoch=epoch,
        step=0,
        max_staleness=0,
        n_ids=ids.size,
        body_len=8 * ids.size,
    )
    fields.update(kw)
    return Request(**fields).pack() + ids.astype("<i8").tobytes()


def assert_error(s: socket.socket, code: Code, *words: str, reason: Reason = Reason.BAD_REQUEST) -> str:
    """The next frame is an error with this code, reason (in its `dim` field) and words."""
    reply, body = read_reply(s)
    text = body.decode()
    assert reply.status == STATUS_OF[code], (reply.status, text)
    assert reason_of_number(reply.dim) == reason, (reply.dim, text)
    for w in words:
        assert w in text, text
    return text


def assert_good(s: socket.socket, rid: int = 99) -> None:
    """A valid lookup on this connection returns the right rows."""
    ids = np.array([0, 5, 4000, 8197])
    s.sendall(request(ids, rid=rid))
    reply, body = read_reply(s)
    assert reply.status == 0 and reply.request_id == rid and reply.dim == DIM
    rows = torch.frombuffer(bytearray(body), dtype=torch.float32).view(-1, DIM)
    assert torch.equal(rows, expected_rows_tiny(ids))


def expected_rows_tiny(ids: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from engram.config import load_config

    cfg = load_config("tiny", overrides=["engram.table_size_per_ngram=[4099,4099]"])
    return expected_rows(cfg, 1, ids, dtype=dtype)


def assert_closed(s: socket.socket) -> None:
    s.settimeout(10)
    try:
        assert s.recv(1) == b""
    except ConnectionResetError:  # closed with the rest of our bytes unread: the kernel resets
        pass


def test_every_reason_has_one_wire_number() -> None:
    assert sorted(WIRE_REASONS) == sorted(Reason) and len(set(WIRE_REASONS)) == len(WIRE_REASONS)
    assert [reason_of_number(i + 1) for i in range(len(WIRE_REASONS))] == list(WIRE_REASONS)
    assert reason_of_number(0) is None and reason_of_number(len(WIRE_REASONS) + 1) is None  # none, or a newer one


def test_truncated_header_and_body(shard) -> None:
    with connect(shard) as s:
        s.sendall(request(np.arange(4))[:30])
        s.shutdown(socket.SHUT_WR)
        assert_error(s, Code.INVALID_ARGUMENT, "truncated", "30 of 64")
        assert_closed(s)
    with connect(shard) as s:
        s.sendall(request(np.arange(100))[: REQUEST.size + 400])
        s.shutdown(socket.SHUT_WR)
        assert_error(s, Code.INVALID_ARGUMENT, "truncated", "400 of 800")
        assert_closed(s)


def test_recoverable_errors_keep_the_connection(shard) -> None:
    with connect(shard) as s:
        ids = np.arange(4)
        s.sendall(
            Request(request_id=1, table=1, dtype=1, epoch=1, step=0, max_staleness=0, n_ids=2, body_len=17).pack()
            + b"x" * 17
        )
        assert_error(s, Code.INVALID_ARGUMENT, "wrong length", "17")
        assert_good(s)
        s.sendall(request(ids, table=9))
        assert_error(s, Code.INVALID_ARGUMENT, "table 9")
        assert_good(s)
        s.sendall(request(ids, dtype=7))
        assert_error(s, Code.INVALID_ARGUMENT, "dtype")
        assert_good(s)
        s.sendall(request(np.array([1, 2, shard.num_rows + 5])))
        assert_error(s, Code.OUT_OF_RANGE, "outside", str(shard.num_rows + 5), reason=Reason.ROW_OUT_OF_RANGE)
        s.sendall(request(np.array([-1, 2])))
        assert_error(s, Code.OUT_OF_RANGE, "-1", reason=Reason.ROW_OUT_OF_RANGE)
        assert_good(s)
        s.sendall(request(ids, epoch=0))
        assert_error(s, Code.FAILED_PRECONDITION, "stale slot-map epoch", reason=Reason.EPOCH_STALE)
        s.sendall(request(ids, epoch=5))
        assert_error(s, Code.UNAVAILABLE, "epoch 5", reason=Reason.EPOCH_AHEAD)
        s.sendall(request(ids, kind=3))
        assert_error(s, Code.UNIMPLEMENTED, "kind")
        s.sendall(request(ids, step=10, max_staleness=2))
        assert_error(s, Code.UNAVAILABLE, "staleness bound 2", reason=Reason.STALENESS_BOUND)
        assert_good(s)


def test_oversized_requests(shard) -> None:
    with connect(shard) as s:
        n = (1 << 20) // (DIM * 4) + 1  # reply just over cluster.max_message_mb=1
        t0 = time.monotonic()
        s.sendall(request(np.zeros(n, dtype=np.int64)))
        assert_error(s, Code.RESOURCE_EXHAUSTED, "oversized", str(n), reason=Reason.REPLY_TOO_LARGE)
        assert_good(s)
        assert time.monotonic() - t0 < 10
    with connect(shard) as s:  # a body that cannot be skipped: answered, then closed
        s.sendall(
            Request(
                request_id=3, table=1, dtype=1, epoch=1, step=0, max_staleness=0, n_ids=1 << 40, body_len=8 << 40
            ).pack()
        )
        assert_error(s, Code.RESOURCE_EXHAUSTED, "oversized", "closing", reason=Reason.REPLY_TOO_LARGE)
        assert_closed(s)


def test_bad_magic_closes_with_an_error_frame(shard) -> None:
    with connect(shard) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
        assert_error(s, Code.INVALID_ARGUMENT, "bad frame", "closing")
        assert_closed(s)


def test_a_client_that_sends_without_reading_gets_every_reply_intact(shard) -> None:
    """Requests sent back to back while no reply is read for a second: ~20 MiB of replies pile up
    past the socket buffers, the shard stops reading requests until they drain, and a reply
    buffer still being sent is never reused for the next reply."""
    rng = np.random.default_rng(3)
    sets = [rng.integers(0, shard.num_rows, size=int(rng.integers(6000, 7800))) for _ in range(90)]
    with connect(shard) as s:
        s.settimeout(60)
        sender = threading.Thread(target=lambda: [s.sendall(request(ids, rid=100 + i)) for i, ids in enumerate(sets)])
        sender.start()
        time.sleep(1.0)
        for i, ids in enumerate(sets):
            reply, body = read_reply(s)
            assert reply.status == 0 and reply.request_id == 100 + i, (i, reply)
            rows = torch.frombuffer(bytearray(body), dtype=torch.float32).view(-1, DIM)
            assert torch.equal(rows, expected_rows_tiny(ids)), i
        sender.join(10)
        assert not sender.is_alive()
        assert_good(s)


def test_client_leaving_mid_reply_and_fuzz_leave_the_shard_serving(shard) -> None:
    n = (1 << 20) // (DIM * 4) - 16  # a large (chunked) reply within the limit
    for _ in range(5):
        with connect(shard) as s:
            s.sendall(request(np.arange(n) % shard.num_rows))
            s.recv(1000)  # then go away with most of the reply unread
    rng = np.random.default_rng(1)
    for i in range(200):  # hostile headers: random fields after a valid magic and version
        raw = bytearray(rng.bytes(REQUEST.size))
        struct.pack_into("<IH", raw, 0, 0x51524745, 1)
        with connect(shard) as s:
            s.sendall(bytes(raw))  # the header alone: whatever the shard does next, it has read all we sent
            with contextlib.suppress(OSError):  # it may have answered and closed already
                s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            reply = Reply.unpack(recv_exact(s, REPLY.size))
            assert reply.magic == REPLY_MAGIC and reply.status != 0, i
    with connect(shard) as s:
        assert_good(s)
    with grpc.insecure_channel(shard.address) as ch:  # nothing was written
        stub = shard_pb2_grpc.MemoryShardStub(ch)
        stats = stub.Stats(shard_pb2.StatsRequest(), timeout=10)
        assert stats.updates == 0 and stats.tables[0].applied_step == 0
        ids = np.arange(0, shard.num_rows, 97)
        resp = stub.Lookup(
            shard_pb2.LookupRequest(table=1, epoch=1, row_ids=ids.astype("<i8").tobytes(), dtype=shard_pb2.FP32),
            timeout=10,
        )
        got = torch.frombuffer(bytearray(resp.rows), dtype=torch.float32).view(-1, DIM)
        assert torch.equal(got, expected_rows_tiny(ids))
    assert shard.proc.poll() is None


def test_a_slow_reader_of_a_chunked_reply_holds_up_no_other_connection(big_shard) -> None:
    """A 24 MiB reply (12 chunks, more than the kernel's socket buffers hold) read 64 KiB at a
    time: the shard waits for its bytes to go out before it gathers more, serves another
    connection meanwhile, and the slow reader gets every row intact and keeps a usable
    connection. (A shard that never woke from that wait would leave this reply unfinished.)"""
    ids = np.random.default_rng(5).integers(0, big_shard.num_rows, size=(24 << 20) // (DIM * 4))
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # a small window: the rest waits at the shard
    slow.settimeout(30)
    slow.connect(("127.0.0.1", big_shard.data_port))
    with slow, connect(big_shard) as other:
        slow.sendall(request(ids, rid=11))
        reply = Reply.unpack(recv_exact(slow, REPLY.size))
        assert reply.status == 0 and reply.request_id == 11 and reply.body_len == ids.size * DIM * 4
        body = bytearray()
        for i in range(8):  # half a second of slow reading, another client served in between
            body += slow.recv(64 << 10)
            time.sleep(0.05)
            if i == 3:
                t0 = time.monotonic()
                assert_good(other)
                assert time.monotonic() - t0 < 5.0
        body += recv_exact(slow, reply.body_len - len(body))
        rows = torch.frombuffer(body, dtype=torch.float32).view(-1, DIM)
        assert torch.equal(rows, expected_rows_tiny(ids))
        assert_good(slow)
    assert big_shard.proc.poll() is None


def test_a_chunked_reply_of_converted_rows_is_gathered_in_the_pool_and_exact(big_shard) -> None:
    """fp16 from the fp32 weights (no fp16 mirror): each 2 MiB chunk is converted in the shard's
    worker pool, not taken whole on its loop; the rows equal the weights rounded to fp16."""
    ids = np.random.default_rng(6).integers(0, big_shard.num_rows, size=(6 << 20) // (DIM * 2))
    with connect(big_shard) as s:
        s.sendall(request(ids, rid=12, dtype=shard_pb2.FP16))
        reply, body = read_reply(s)
        assert reply.status == 0 and reply.request_id == 12 and reply.body_len == ids.size * DIM * 2
        rows = torch.frombuffer(bytearray(body), dtype=torch.float16).view(-1, DIM)
        assert torch.equal(rows, expected_rows_tiny(ids, torch.float16))
        assert_good(s)
    assert big_shard.proc.poll() is None
