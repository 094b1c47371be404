"""Where a layer's rows come from: the model's own tables or the memory shards, as futures.

`LocalRowSource` reads the model's tables (tests, the baseline); `RemoteRowSource` sends the
unique rows of every layer to the shards through the asyncio `ShardClient` on a `LoopThread`
and lands them (pinned host memory, then the device on a side stream) as they arrive. The
pipeline that issues and waits on them is `worker/prefetch.py`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures as cf
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from engram.indexer import to_device
from engram.model import EngramLM
from services.client.loop import LoopThread

T = TypeVar("T")


class RowsUnavailable(RuntimeError):
    """A layer's rows did not arrive (deadline passed or a shard failed); the text says which."""


@dataclass(slots=True)
class Landed:
    rows: torch.Tensor  # (U, dh) on the target device (or CPU)
    event: Any = None  # torch.cuda.Event recorded after the device copy, None on CPU


class Lander:
    """Stage 3: CPU rows -> pinned host memory -> device on a side stream, with an event."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def land(self, rows_cpu: torch.Tensor) -> Landed:
        if not self.cuda:
            return Landed(rows_cpu.to(self.device))
        pinned = torch.empty(rows_cpu.shape, dtype=rows_cpu.dtype, pin_memory=True)  # (U, dh)
        pinned.copy_(rows_cpu)
        with torch.cuda.stream(self.stream):
            rows = pinned.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Landed(rows, event)


class RowSource(abc.ABC):
    """Stage 2: `issue` returns at once; each future resolves to that layer's `Landed` rows."""

    @abc.abstractmethod
    def issue(self, unique: dict[int, torch.Tensor]) -> dict[int, cf.Future[Landed]]:
        """{layer: unique rows (U,)} -> {layer: future of rows (U, dh) in the same order}."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class LocalRowSource(RowSource):
    """The model's own tables (tests and the in-device baseline); futures are already done."""

    def __init__(self, model: EngramLM) -> None:
        self.model = model

    def issue(self, unique: dict[int, torch.Tensor]) -> dict[int, cf.Future[Landed]]:
        out: dict[int, cf.Future[Landed]] = {}
        for layer, ids in unique.items():
            table = self.model.tables[str(layer)]
            fut: cf.Future[Landed] = cf.Future()
            fut.set_result(Landed(table(to_device(ids, self.model.device))))  # (U, dh), sparse grad
            out[layer] = fut
        return out


class AsyncRowClient(Protocol):
    """What `RemoteRowSource` needs of a shard client: rows of `row_ids` in request order."""

    def lookup(self, table: int, row_ids: torch.Tensor) -> Awaitable[Any]: ...


def rows_of(result: Any) -> torch.Tensor:
    """Normalise a client lookup result to (U, dh) rows in request order.

    Accepts a tensor, or a handle exposing `rows` (unique rows) and optionally `inverse`
    (request position -> row), as `services.client.ShardClient` returns.
    """
    if isinstance(result, torch.Tensor):
        return result
    rows = result.rows
    inverse = getattr(result, "inverse", None)
    if inverse is None:
        return rows
    inverse = torch.as_tensor(inverse).reshape(-1)
    if inverse.numel() == rows.shape[0] and bool((inverse == torch.arange(rows.shape[0])).all()):
        return rows
    return rows[inverse]


class RemoteRowSource(RowSource):
    """Memory shards through an asyncio client, driven from a `LoopThread`."""

    def __init__(
        self,
        client: AsyncRowClient,
        *,
        loop: LoopThread,
        device: torch.device | str = "cpu",
        timeout_s: float = 10.0,
        owns: Callable[[], Awaitable[None]] | None = None,
        owns_loop: bool = False,
    ) -> None:
        """`owns`: a coroutine function closing the client at `close()`; `owns_loop`: stop the loop too."""
        self.client, self.loop, self.timeout_s, self.owns_loop = client, loop, timeout_s, owns_loop
        self.lander = Lander(torch.device(device))
        self._close_client = owns

    async def _fetch(self, layer: int, ids_cpu: torch.Tensor) -> Landed:
        try:
            result = await asyncio.wait_for(self._lookup(layer, ids_cpu), self.timeout_s)
        except TimeoutError:
            raise RowsUnavailable(
                f"Engram layer {layer}: the memory shards did not answer a lookup of {ids_cpu.numel()} rows "
                f"within cluster.lookup_timeout_s={self.timeout_s:g}s"
            ) from None
        return self.lander.land(rows_of(result))

    async def _lookup(self, layer: int, ids_cpu: torch.Tensor) -> Any:
        result = self.client.lookup(layer, ids_cpu)  # ShardClient: a LookupHandle, requests already sent
        while inspect.isawaitable(result):  # await handle -> (U, dh) rows in request order
            result = await result
        return result

    def issue(self, unique: dict[int, torch.Tensor]) -> dict[int, cf.Future[Landed]]:
        # the indices are CPU tensors (engram.indexer): `.cpu()` is a no-op here, not a device sync
        out: dict[int, cf.Future[Landed]] = {}
        to_loop: dict[int, tuple[torch.Tensor, cf.Future[Landed]]] = {}
        read_now = getattr(self.client, "read_now", None)  # ShardClient: rows mapped from shared memory
        for layer, ids in unique.items():
            ids_cpu = ids.detach().cpu()
            fut: cf.Future[Landed] = cf.Future()
            out[layer] = fut
            if read_now is not None:
                try:
                    now = read_now(layer, ids_cpu)  # on this thread: no hop to the loop thread
                    if now is not None:
                        fut.set_result(self.lander.land(now[0]))  # (U, dh)
                except Exception as exc:  # noqa: BLE001 - raised where the future is read, as on the loop
                    fut.set_exception(exc)
                if fut.done():
                    continue
            to_loop[layer] = (ids_cpu, fut)
        if to_loop:
            # one hop to the loop thread for every layer: each hop wakes the loop, which then takes
            # the GIL while this thread goes on; per layer that was ~7% of a decode step (py-spy)
            self.loop.submit(self._fetch_all(to_loop))
        return out

    async def _fetch_all(self, layers: dict[int, tuple[torch.Tensor, cf.Future[Landed]]]) -> None:
        """Issue every layer's lookup now; each layer's future resolves as its own rows land."""

        async def one(layer: int, ids_cpu: torch.Tensor, fut: cf.Future[Landed]) -> None:
            try:
                landed = await self._fetch(layer, ids_cpu)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader of the future
                _settle(fut, exc=exc if not isinstance(exc, asyncio.CancelledError) else cf.CancelledError())
                if not isinstance(exc, Exception):
                    raise
            else:
                _settle(fut, result=landed)

        tasks = [asyncio.ensure_future(one(layer, ids, fut)) for layer, (ids, fut) in layers.items()]
        for task, (_, fut) in zip(tasks, layers.values()):  # a reader that gives up (fut.cancel()) stops its lookup
            fut.add_done_callback(self._cancel_with(task))
        await asyncio.gather(*tasks, return_exceptions=True)

    def _cancel_with(self, task: asyncio.Future[None]) -> Callable[[cf.Future[Landed]], None]:
        def done(fut: cf.Future[Landed]) -> None:
            if fut.cancelled():
                self.loop.loop.call_soon_threadsafe(task.cancel)

        return done

    def close(self) -> None:
        if self._close_client is not None:
            try:
                self.loop.call(self._close_client(), timeout=5)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        if self.owns_loop:
            self.loop.close()


def _settle(fut: cf.Future[T], *, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve `fut` unless its reader cancelled it meanwhile."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except cf.InvalidStateError:  # cancelled by the reader (a timeout): nobody waits for it
        pass
