"""The TCP data plane's client framing (services/client/dataplane.py) against a scripted server.

A unit test of the client's side alone: a loopback server in this process answers each
request with what the case scripts (a good reply, an error frame, a reply to another request,
a reply cut off mid-rows, an idle close). The real shard's side is tests/test_dataplane_bad_input.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
import torch

from services.client.dataplane import RCV_LOWAT, DataPlaneClient, DataPlaneDown, _Conn
from services.client.errors import Code, ShardError
from services.client.row_request import RowRequest
from services.errors import Reason, error_reason
from services.frames import REPLY, REQUEST, STATUS_OF, Reply, Request, error_reply

DIM = 4
FP32 = 1
Script = Callable[[Request, np.ndarray], tuple[bytes | list[bytes], bool]]  # -> (bytes, or pieces sent
# apart with a pause between them, and whether to keep the connection open)


def rows_for(ids: np.ndarray) -> np.ndarray:
    return (ids[:, None] * 10 + np.arange(DIM)).astype(np.float32)  # (n, D)


def reply(req: Request, ids: np.ndarray, **kw: int) -> bytes:
    body = rows_for(ids).tobytes()
    fields = dict(
        status=0, request_id=req.request_id, epoch=req.epoch, applied_step=3, dim=DIM, dtype=FP32, body_len=len(body)
    )
    fields.update(kw)
    return Reply(**fields).pack() + (body if not fields["status"] else b"")


def good(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
    return reply(req, ids), True


async def serve(scripts: list[Script]) -> tuple[asyncio.AbstractServer, list[int]]:
    """Answer the i-th request (over all connections) with scripts[i] -> (server, connections seen)."""
    conns: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(1)
        try:
            while scripts:
                req = Request.unpack(await reader.readexactly(REQUEST.size))
                ids = np.frombuffer(await reader.readexactly(req.body_len), dtype="<i8")
                data, keep = scripts.pop(0)(req, ids)
                for piece in data if isinstance(data, list) else [data]:
                    writer.write(piece)
                    await writer.drain()
                    if isinstance(data, list):
                        await asyncio.sleep(0.01)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, conns


def run(scripts: list[Script], body: Callable[[DataPlaneClient, list[Script]], Awaitable[None]]) -> int:
    """-> connections the server saw."""

    async def go() -> int:
        server, conns = await serve(scripts)
        client = DataPlaneClient(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", shard_id=0)
        try:
            await body(client, scripts)
        finally:
            client.close()
            server.close()
        return len(conns)

    return asyncio.run(asyncio.wait_for(go(), 20))


async def lookup(client: DataPlaneClient, ids: np.ndarray) -> torch.Tensor:
    rows, applied = await client.lookup(RowRequest(1, np.asarray(ids, dtype=np.int64), FP32, DIM, 1))
    assert applied == 3
    return rows


def test_rows_error_frames_and_reuse() -> None:
    def error(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
        return error_reply(
            Code.OUT_OF_RANGE, "row_ids: 1 of 2 ids are outside", req.request_id, reason=Reason.ROW_OUT_OF_RANGE
        ), True

    async def body(client: DataPlaneClient, scripts: list[Script]) -> None:
        ids = np.array([3, 1, 4, 1_000_000])
        assert torch.equal(await lookup(client, ids), torch.from_numpy(rows_for(ids)))
        with pytest.raises(ShardError) as info:
            await lookup(client, np.array([5, -1]))
        assert info.value.code == Code.OUT_OF_RANGE and "outside" in str(info.value)
        assert error_reason(info.value) == Reason.ROW_OUT_OF_RANGE  # the frame's reason, as gRPC's ErrorInfo
        assert (await lookup(client, np.zeros(0))).shape == (0, DIM)
        big = np.arange(20000)  # ids written apart from the header, rows over many reads
        assert torch.equal(await lookup(client, big), torch.from_numpy(rows_for(big)))

    assert run([good, error, good, good], body) == 1  # the error frame left the connection in sync: reused


def test_broken_replies_raise_and_drop_the_connection() -> None:
    def other_request(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
        return reply(req, ids, request_id=req.request_id + 7), True

    def cut(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
        return reply(req, ids)[: REPLY.size + 10], False  # the header and 10 row bytes, then close

    def wrong_dim(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
        return reply(req, ids, dim=DIM + 1), True

    def huge_error(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
        return reply(req, ids, status=STATUS_OF[Code.INTERNAL], body_len=1 << 20), True

    def silent_close(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
        return b"", False

    async def body(client: DataPlaneClient, scripts: list[Script]) -> None:
        ids = np.array([1, 2])
        for what in ("out of sync", "closed", "malformed", "error message", "closed"):
            with pytest.raises(DataPlaneDown, match=what):
                await lookup(client, ids)
            assert not client._idle, what  # never reused
        assert torch.equal(await lookup(client, ids), torch.from_numpy(rows_for(ids)))  # a fresh connection

    assert run([other_request, cut, wrong_dim, huge_error, silent_close, good], body) == 6


def test_an_idle_connection_the_server_closed_is_not_used() -> None:
    def last(req: Request, ids: np.ndarray) -> tuple[bytes, bool]:
        return reply(req, ids), False

    async def body(client: DataPlaneClient, scripts: list[Script]) -> None:
        await lookup(client, np.array([7]))
        await asyncio.sleep(0.2)  # the server closed the connection after its reply
        assert len(client._idle) == 1 and client._idle[0].lost is not None
        scripts.append(good)
        assert torch.equal(await lookup(client, np.array([7])), torch.from_numpy(rows_for(np.array([7]))))

    assert run([last], body) == 2


def in_pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    cuts = np.cumsum([0, *sizes])
    return [data[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)] + [data[cuts[-1] :]]


def test_a_large_reply_arriving_slowly_wakes_the_reader_per_lowat_and_never_waits_past_its_end() -> None:
    """A reply over RCV_LOWAT: the socket's SO_RCVLOWAT is raised for its body, lowered to what is
    still owed near the end (a last piece smaller than RCV_LOWAT still completes it), back to 1
    after; a reply cut short mid-body still fails at once (a close wakes the reader)."""
    ids = np.arange(40_000)  # 640 KB of fp32 rows, > RCV_LOWAT
    body_bytes = len(rows_for(ids).tobytes())
    assert body_bytes > 2 * RCV_LOWAT

    def slow(req: Request, ids: np.ndarray) -> tuple[bytes | list[bytes], bool]:
        return in_pieces(reply(req, ids), [REPLY.size, 100_000, 300_000, 999]), True  # then the ~240 KB rest

    def cut(req: Request, ids: np.ndarray) -> tuple[bytes | list[bytes], bool]:
        return in_pieces(reply(req, ids)[: REPLY.size + 300_000], [REPLY.size, 100_000]), False

    async def body(client: DataPlaneClient, scripts: list[Script]) -> None:
        rows = await asyncio.wait_for(lookup(client, ids), 5)
        assert torch.equal(rows, torch.from_numpy(rows_for(ids)))
        conn = client._idle[0]
        assert conn._sock is not None and conn._lowat == 1
        assert conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # idle: any byte wakes it
        with pytest.raises(DataPlaneDown, match="closed"):
            await asyncio.wait_for(lookup(client, ids), 5)  # cut mid-body with SO_RCVLOWAT raised

    seen: list[int] = []
    real = _Conn._set_lowat

    def spy(self: _Conn, nbytes: int) -> None:
        seen.append(nbytes)
        real(self, nbytes)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Conn, "_set_lowat", spy)
        assert run([slow, cut], body) == 1  # the cut reply came on the same (reused) connection
    first = seen[: seen.index(1) + 1]  # the slow reply: raised, lowered near its end, back to 1
    assert first[0] == RCV_LOWAT and first[-1] == 1
    owed = first[1:-1]
    assert owed and all(0 < n < RCV_LOWAT for n in owed) and owed == sorted(owed, reverse=True)
    assert seen[len(first)] == RCV_LOWAT  # raised again for the reply that was cut
