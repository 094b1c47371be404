"""A hot-row cache on the device: N-gram use is Zipf-distributed, so few rows serve most lookups.

Policy: LRU over a fixed number of row slots per layer (bounded bytes, split evenly across
the Engram layers), fully vectorised without per-row Python: the cache keeps `rows (C, dh)`
on the device and its bookkeeping -- `ids (C,)`, `last_use (C,)`, `version (C,)` -- on the
CPU, next to the CPU indices it is asked about (`engram.indexer`): which rows hit decides
what is sent to the shards, a host decision, so on the device every hit mask, count and
eviction would make the host wait for the GPU. A lookup is a `searchsorted` over the sorted
ids; an insert overwrites the least recently used slots. Only misses go to the shards
(`PrefetchPipeline` asks the cache first). `stats()` reports the hit rate.

Two modes:

* **frozen tables (inference)**: `max_staleness=None`. Rows never change, so a cached row
  is always valid; `step`/`version` are ignored.
* **training**: `max_staleness=k` (0 for sync mode). Every cached row carries the version
  (optimizer step) it was fetched at; `lookup(..., step=s)` serves it only if
  `version >= s - k`, otherwise it counts as a miss and is fetched again (and the insert
  overwrites it). After the trainer pushes gradients for rows, it must call `invalidate`
  on them (their shard copy changed); with k = 0 a row fetched at step s is only valid for
  step s, so a cache can never serve a row older than the mode allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engram.indexer import to_device


@dataclass(slots=True)
class CacheStats:
    lookups: int = 0  # rows asked for
    hits: int = 0
    stale: int = 0  # present but too old (training)
    inserts: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class _LayerCache:
    def __init__(self, capacity: int, dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self.ids = torch.full((capacity,), -1, dtype=torch.int64)  # (C,) row id, -1 empty; CPU
        self.rows = torch.zeros((capacity, dim), dtype=dtype, device=device)  # (C, dh) on the device
        self.last_use = torch.full((capacity,), -1, dtype=torch.int64)  # (C,) LRU tick; CPU
        self.version = torch.zeros((capacity,), dtype=torch.int64)  # (C,) step fetched at; CPU
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None

    def find(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q,) ids -> found (Q,) bool, slot (Q,) int64 (meaningless where not found)."""
        if self._sorted is None:
            self._sorted = torch.sort(self.ids)
        sorted_ids, order = self._sorted
        pos = torch.searchsorted(sorted_ids, query).clamp_(max=sorted_ids.numel() - 1)
        return sorted_ids[pos] == query, order[pos]

    def touched(self) -> None:
        self._sorted = None

    def on_device(self, slots: torch.Tensor) -> torch.Tensor:
        """CPU slot indices -> the rows' device, without a sync."""
        return to_device(slots, self.rows.device)


class HotRowCache:
    """Bounded-bytes LRU cache of Engram rows, per layer, on `device`."""

    def __init__(
        self,
        *,
        capacity_bytes: int,
        dims: dict[int, int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_staleness: int | None = None,
    ) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes: must be positive, got {capacity_bytes}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0 or None (frozen tables), got {max_staleness}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_layer = capacity_bytes // max(1, len(dims))
        self.layers: dict[int, _LayerCache] = {}
        for layer, dim in dims.items():
            capacity = per_layer // (dim * itemsize)
            if capacity < 1:
                raise ValueError(f"capacity_bytes: {capacity_bytes} B holds no {dim}-dim row for layer {layer}")
            self.layers[layer] = _LayerCache(capacity, dim, dtype=dtype, device=torch.device(device))
        self.max_staleness = max_staleness
        self.capacity_bytes = capacity_bytes
        self._tick = 0
        self._stats = CacheStats()

    def capacity(self, layer: int) -> int:
        return self.layers[layer].ids.numel()

    def _valid(self, cache: _LayerCache, slots: torch.Tensor, step: int | None) -> torch.Tensor | None:
        if self.max_staleness is None:
            return None
        if step is None:
            raise ValueError("step: a training cache (max_staleness set) needs the current step")
        return cache.version[slots] >= step - self.max_staleness

    def lookup(self, layer: int, ids: torch.Tensor, *, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(U,) unique ids -> hit mask (U,) bool on the CPU, rows of the hits (H, dh) on the device."""
        cache = self.layers[layer]
        ids = ids.cpu()  # a no-op for the pipeline's CPU indices
        self._tick += 1
        found, slots = cache.find(ids)
        valid = self._valid(cache, slots, step)
        hit = found if valid is None else found & valid
        if valid is not None:
            self._stats.stale += int((found & ~valid).sum())
        hit_slots = slots[hit]
        cache.last_use[hit_slots] = self._tick
        self._stats.lookups += ids.numel()
        self._stats.hits += hit_slots.numel()
        return hit, cache.rows[cache.on_device(hit_slots)]

    def insert(self, layer: int, ids: torch.Tensor, rows: torch.Tensor, *, version: int | None = None) -> None:
        """Cache rows (N, dh) of unique ids (N,), evicting least recently used slots."""
        if self.max_staleness is not None and version is None:
            raise ValueError("version: a training cache needs the step the rows were fetched at")
        cache = self.layers[layer]
        ids, rows = ids.cpu(), rows.to(device=cache.rows.device, dtype=cache.rows.dtype)  # (N,) CPU, (N, dh)
        if ids.numel() == 0:
            return
        self._tick += 1
        found, slots = cache.find(ids)
        if found.any():  # present but stale: refresh in place
            at = found.nonzero().squeeze(1)  # (F,) CPU positions into ids/rows
            cache.rows[cache.on_device(slots[at])] = rows[cache.on_device(at)]
            cache.version[slots[at]] = version or 0
            cache.last_use[slots[at]] = self._tick
            keep = (~found).nonzero().squeeze(1)
            ids, rows = ids[keep], rows[cache.on_device(keep)]
        capacity = cache.ids.numel()
        if ids.numel() > capacity:  # more new rows than the whole cache: keep the last ones
            ids, rows = ids[-capacity:], rows[-capacity:]
        n = ids.numel()
        if n == 0:
            return
        victims = torch.topk(cache.last_use, n, largest=False).indices  # (n,) empty slots (-1) first
        self._stats.evictions += int((cache.ids[victims] >= 0).sum())
        cache.ids[victims] = ids
        cache.rows[cache.on_device(victims)] = rows
        cache.version[victims] = version or 0
        cache.last_use[victims] = self._tick
        cache.touched()
        self._stats.inserts += n

    def invalidate(self, layer: int, ids: torch.Tensor) -> int:
        """Drop rows whose shard copy changed (after a gradient push); -> how many were cached."""
        cache = self.layers[layer]
        found, slots = cache.find(ids.cpu())
        slots = slots[found]
        cache.ids[slots] = -1
        cache.last_use[slots] = -1
        cache.touched()
        return slots.numel()

    def stats(self) -> CacheStats:
        return CacheStats(**{k: getattr(self._stats, k) for k in CacheStats.__slots__})  # a copy

    def reset_stats(self) -> None:
        self._stats = CacheStats()
