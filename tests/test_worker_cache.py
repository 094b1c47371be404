"""The hot-row cache: bounded bytes, LRU eviction, hit rate, and the training staleness rule."""

from __future__ import annotations

import pytest
import torch

from worker.cache import HotRowCache


def rows_for(ids: torch.Tensor, dim: int = 4) -> torch.Tensor:
    return ids.float().unsqueeze(1).expand(-1, dim) + torch.arange(dim) / 10  # (N, dim), row i is known


def test_bounded_bytes_and_lru_eviction() -> None:
    cache = HotRowCache(capacity_bytes=4 * 4 * 3, dims={1: 4})  # three 4-dim fp32 rows
    assert cache.capacity(1) == 3
    cache.insert(1, torch.tensor([10, 11, 12]), rows_for(torch.tensor([10, 11, 12])))
    hit, rows = cache.lookup(1, torch.tensor([10, 99]))  # touch 10 -> 11 is now least recent
    assert hit.tolist() == [True, False] and torch.equal(rows, rows_for(torch.tensor([10])))
    cache.insert(1, torch.tensor([13]), rows_for(torch.tensor([13])))
    hit, rows = cache.lookup(1, torch.tensor([10, 11, 12, 13]))
    assert hit.tolist() == [True, False, True, True]
    assert torch.equal(rows, rows_for(torch.tensor([10, 12, 13])))
    s = cache.stats()
    assert (s.lookups, s.hits, s.evictions) == (6, 4, 1) and s.hit_rate == pytest.approx(4 / 6)


def test_more_rows_than_capacity_keeps_the_cache_consistent() -> None:
    cache = HotRowCache(capacity_bytes=4 * 4 * 2, dims={1: 4})
    ids = torch.arange(5)
    cache.insert(1, ids, rows_for(ids))
    hit, rows = cache.lookup(1, ids)
    assert hit.sum() == 2 and torch.equal(rows, rows_for(ids[hit]))


def test_zipf_traffic_hits_mostly() -> None:
    g = torch.Generator().manual_seed(0)
    cache = HotRowCache(capacity_bytes=1000 * 8 * 4, dims={1: 8})
    weights = 1.0 / torch.arange(1, 5001, dtype=torch.float64) ** 1.1
    for _ in range(30):
        ids = torch.unique(torch.multinomial(weights, 512, replacement=True, generator=g))
        hit, _ = cache.lookup(1, ids)
        cache.insert(1, ids[~hit], rows_for(ids[~hit], 8))
    assert cache.stats().hit_rate > 0.5  # 1000 of 5000 rows cached (20%)


def test_training_cache_never_serves_a_row_older_than_the_staleness_bound() -> None:
    cache = HotRowCache(capacity_bytes=1024, dims={1: 4}, max_staleness=1)
    ids = torch.tensor([1, 2])
    cache.insert(1, ids, rows_for(ids), version=5)
    assert cache.lookup(1, ids, step=6)[0].all()  # one step old: allowed
    hit, _ = cache.lookup(1, ids, step=7)  # two steps old: refetch
    assert not hit.any() and cache.stats().stale == 2
    cache.insert(1, ids, rows_for(ids) + 1, version=7)  # refresh in place
    hit, rows = cache.lookup(1, ids, step=7)
    assert hit.all() and torch.equal(rows, rows_for(ids) + 1)
    assert cache.invalidate(1, torch.tensor([2, 3])) == 1  # the trainer pushed row 2
    assert cache.lookup(1, ids, step=7)[0].tolist() == [True, False]
    with pytest.raises(ValueError, match="step"):
        cache.lookup(1, ids)
    with pytest.raises(ValueError, match="version"):
        cache.insert(1, ids, rows_for(ids))


def test_sync_mode_staleness_zero_only_serves_the_same_step() -> None:
    cache = HotRowCache(capacity_bytes=1024, dims={1: 4}, max_staleness=0)
    cache.insert(1, torch.tensor([4]), rows_for(torch.tensor([4])), version=3)
    assert cache.lookup(1, torch.tensor([4]), step=3)[0].item()
    assert not cache.lookup(1, torch.tensor([4]), step=4)[0].item()


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        HotRowCache(capacity_bytes=0, dims={1: 4})
    with pytest.raises(ValueError, match="capacity_bytes"):
        HotRowCache(capacity_bytes=8, dims={1: 4})
    with pytest.raises(ValueError, match="max_staleness"):
        HotRowCache(capacity_bytes=1024, dims={1: 4}, max_staleness=-1)
