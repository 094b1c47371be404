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

import concurrent.futures as cf
from collections.abc import Callable, Iterator, Mapping

import torch

from engram.engram_layer import EngramRows
from engram.indexer import to_device
from engram.model import EngramLM
from services.client.loop import LoopThread
from worker.cache import HotRowCache
from worker.row_sources import (  # re-exported: the worker's and tests' import path
    AsyncRowClient,
    Landed,
    Lander,
    LocalRowSource,
    RemoteRowSource,
    RowSource,
    RowsUnavailable,
    rows_of,
)

__all__ = [
    "AsyncRowClient",
    "Landed",
    "Lander",
    "LazyRows",
    "LocalRowSource",
    "LoopThread",
    "PrefetchHandle",
    "PrefetchPipeline",
    "RemoteRowSource",
    "RowSource",
    "RowsUnavailable",
    "rows_of",
]


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
