"""The prefetch pipeline: Engram rows are on their way before the forward pass needs them.

A batch goes through four stages (the way torchrec's TrainPipelineSparseDist writes down
its own); only stage 4 is on the model's critical path:

1. **indices** -- as soon as the batch's token ids are known, `model.engram_indices(ids)`
   computes every Engram layer's hashed rows, deduplicated: {layer: (unique (U,), inverse
   (B, T, Hn))}. Pure torch, no I/O, on the CPU from the CPU ids (pinned when the model is
   on a GPU): hashing on the GPU would make the host wait for it (`unique` has a
   data-dependent size), and the unique rows are what goes to the shards anyway.
2. **issue** -- per layer, the unique rows (minus hot-cache hits, see `worker.cache`) go to
   a `RowSource`, which returns a `concurrent.futures.Future` at once. `LocalRowSource`
   reads the model's own tables (tests, the baseline); `RemoteRowSource` sends them to the
   memory shards through the asyncio `ShardClient`, running on a dedicated event-loop
   thread (`LoopThread`) so that the synchronous model code can issue now and wait later;
   the lookups of all layers are in flight concurrently.
3. **land** -- on the loop thread, when a layer's rows arrive they are copied into pinned
   host memory and then to the device on a side CUDA stream, and a CUDA event is recorded
   after the copy. On CPU the received tensor is used as it is.
4. **wait** -- when block l is reached, `PrefetchHandle.rows(l)` waits for that layer's
   future (bounded by the lookup deadline; a timeout is `RowsUnavailable`), then makes the
   compute stream wait on the event (`current_stream(device).wait_event`) -- the GPU waits
   for a copy, never for the network -- and the Engram layer gathers with the inverse index
   (copied to the device without blocking, from pinned memory).

Nothing on this path makes the host wait for the GPU (tests/test_cuda_sync.py checks it
with `torch.cuda.set_sync_debug_mode("error")`), so the CPU runs ahead and issues the
lookups while the GPU still computes earlier work.

Blocks 0..l-1 run while the rows fly: `handle.lazy()` is a mapping that `EngramLM.forward`
reads per layer (`engram_rows.get(l)` happens when block l runs), so each layer waits for
its own rows only. With `prefetch=False` the pipeline is the synchronous baseline: indices
and lookup happen at the layer, and the network time is on the critical path.

Training (`train=True`): remote rows land as fp32 grad-requiring leaves; after backward,
`handle.rows(l).rows.grad` (U, dh) is the summed gradient per unique row, what the trainer
pushes to the shards. Prefetching batch k+1 while step k computes reads rows from before
step k's update: that is staleness 1, allowed in async mode only; sync mode prefetches
within the step (after the previous step's push is applied).

    pipeline = PrefetchPipeline(model, LocalRowSource(model))
    handle = pipeline.prefetch(ids_cpu)         # stages 1-3 start, from the CPU ids
    ...                                         # anything else (layers 0..l-1)
    logits, _ = model(ids_dev, engram_rows=handle.lazy())   # stage 4 per layer
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures as cf
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from engram.engram_layer import EngramRows
from engram.indexer import to_device
from engram.model import EngramLM
from services.client.loop import LoopThread
from worker.cache import HotRowCache

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


class PrefetchHandle:
    """One batch's rows in flight; `rows(layer)` is stage 4 for one layer."""

    def __init__(
        self,
        *,
        indices: dict[int, tuple[torch.Tensor, torch.Tensor]],
        futures: dict[int, cf.Future[Landed]],
        hits: dict[int, tuple[torch.Tensor, torch.Tensor] | None],
        pipeline: PrefetchPipeline,
    ) -> None:
        self.indices, self.futures, self.hits, self.pipeline = indices, futures, hits, pipeline
        self._done: dict[int, EngramRows] = {}

    def rows(self, layer: int) -> EngramRows:
        if layer in self._done:
            return self._done[layer]
        unique, inverse = self.indices[layer]
        fut = self.futures[layer]
        try:
            landed = fut.result(timeout=self.pipeline.timeout_s + 1.0)
        except cf.TimeoutError:
            fut.cancel()
            raise RowsUnavailable(
                f"Engram layer {layer}: rows did not arrive within {self.pipeline.timeout_s:g}s"
            ) from None
        except RowsUnavailable:
            raise
        except Exception as exc:  # a shard error: name the layer, keep the cause
            raise RowsUnavailable(f"Engram layer {layer}: lookup failed: {exc}") from exc
        if landed.event is not None:  # the copy ran on the lander's side stream of this device
            stream = torch.cuda.current_stream(landed.rows.device)
            stream.wait_event(landed.event)
            landed.rows.record_stream(stream)
        rows = self.pipeline.assemble(layer, unique, landed.rows, hit=self.hits.get(layer))
        out = EngramRows(rows=rows, inverse=to_device(inverse, rows.device))
        self._done[layer] = out
        return out

    def wait(self) -> dict[int, EngramRows]:
        return {layer: self.rows(layer) for layer in self.indices}

    def lazy(self) -> LazyRows:
        return LazyRows(self.rows, list(self.indices))


class LazyRows(Mapping[int, EngramRows]):
    """A mapping `EngramLM.forward` reads per layer: `get(l)` runs when block l is reached."""

    def __init__(self, fetch: Callable[[int], EngramRows], layers: list[int]) -> None:
        self._fetch, self._layers = fetch, layers

    def __getitem__(self, layer: int) -> EngramRows:
        if layer not in self._layers:
            raise KeyError(layer)
        return self._fetch(layer)

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


class PrefetchPipeline:
    """indices -> issue -> land -> wait (module docstring); `prefetch=False` is the sync baseline.

    `train=True` makes remote rows fp32 grad-requiring leaves (their `.grad` is what a trainer
    pushes to the shards); a cache is for frozen tables unless the caller passes `step` and
    gives the cache a staleness bound (see `worker.cache`).
    """

    def __init__(
        self,
        model: EngramLM,
        source: RowSource,
        *,
        prefetch: bool = True,
        cache: HotRowCache | None = None,
        timeout_s: float = 10.0,
        train: bool = False,
    ) -> None:
        if model.indexer is None:
            raise ValueError("model: has no Engram layers, nothing to prefetch")
        self.model, self.source, self.prefetch_enabled = model, source, prefetch
        self.cache, self.timeout_s, self.train = cache, timeout_s, train
        self.step: int | None = None  # training step for the cache's staleness check

    def _issue(self, indices: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> PrefetchHandle:
        hits: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}
        to_fetch: dict[int, torch.Tensor] = {}
        for layer, (unique, _) in indices.items():
            if self.cache is None:
                hits[layer], to_fetch[layer] = None, unique
                continue
            hit_mask, hit_rows = self.cache.lookup(layer, unique, step=self.step)  # (U,), (H, dh)
            hits[layer] = (hit_mask, hit_rows)
            to_fetch[layer] = unique[~hit_mask]
        futures = self.source.issue({layer: ids for layer, ids in to_fetch.items() if ids.numel()})
        for layer, ids in to_fetch.items():
            if not ids.numel():  # every row was a cache hit: nothing to send
                assert self.cache is not None
                done: cf.Future[Landed] = cf.Future()
                hit_rows = hits[layer][1]  # type: ignore[index]
                done.set_result(Landed(hit_rows.new_empty((0, hit_rows.shape[1]))))
                futures[layer] = done
        return PrefetchHandle(indices=indices, futures=futures, hits=hits, pipeline=self)

    def issue(self, indices: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> PrefetchHandle:
        """Stages 2-3 for indices the caller computed (the generation engine hashes at admission)."""
        return self._issue(indices)

    def prefetch(self, ids_BT: torch.Tensor) -> PrefetchHandle:
        """Stages 1-3 for a batch; returns at once with the lookups in flight."""
        with torch.no_grad():
            indices = self.model.engram_indices(ids_BT)
        return self._issue(indices)

    def assemble(
        self,
        layer: int,
        unique: torch.Tensor,
        fetched: torch.Tensor,
        *,
        hit: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Merge cache hits with fetched misses -> (U, dh) in `unique` order; fill the cache.

        The masks are CPU tensors (the cache keeps its bookkeeping there): they become index
        tensors on the CPU and travel to the device without a sync.
        """
        if hit is not None:
            hit_mask, hit_rows = hit  # (U,) bool on the CPU, (H, dh) on the device
            assert self.cache is not None
            self.cache.insert(layer, unique[~hit_mask], fetched.detach(), version=self.step)
            dev = fetched.device
            merged = torch.empty((unique.numel(), fetched.shape[1]), dtype=fetched.dtype, device=dev)
            merged.index_copy_(0, to_device(hit_mask.nonzero().squeeze(1), dev), hit_rows.to(fetched.dtype))
            merged.index_copy_(0, to_device((~hit_mask).nonzero().squeeze(1), dev), fetched)
            fetched = merged
        if self.train and not fetched.requires_grad:
            fetched = fetched.float().requires_grad_(True)  # leaf: its grad goes back to the shards
        return fetched

    def engram_rows(self, ids_BT: torch.Tensor) -> Mapping[int, EngramRows]:
        """What to pass as `engram_rows=`: prefetched now, or (sync baseline) fetched at the layer."""
        if self.prefetch_enabled:
            return self.prefetch(ids_BT).lazy()
        layers = list(self.model.indexer.layouts) if self.model.indexer is not None else []
        indices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def at_layer(layer: int) -> EngramRows:  # issue this layer's lookup now, then wait for it
            if not indices:
                with torch.no_grad():
                    indices.update(self.model.engram_indices(ids_BT))
            return self._issue({layer: indices[layer]}).rows(layer)

        return LazyRows(at_layer, layers)

    def forward(  # type: ignore[no-untyped-def]
        self,
        ids_BT: torch.Tensor,
        targets_BT: torch.Tensor | None = None,
        *,
        ids_cpu: torch.Tensor | None = None,
    ):
        """-> (logits (B, T, V), loss); rows come from the source through the pipeline.

        `ids_cpu`: the same ids on the CPU (what the caller built the batch from), so the
        indices need no device -> host copy.
        """
        rows = self.engram_rows(ids_BT if ids_cpu is None else ids_cpu)
        return self.model(ids_BT, targets_BT, engram_rows=rows)

    def close(self) -> None:
        self.source.close()
