"""Multiplicative-XOR N-gram hashing, bit-compatible with the public Engram demo.

For Engram layer l with multipliers m (odd int64s from numpy's default_rng(seed + 10007*l)):

    mix_n[t]  = XOR_{k<n} (x'[t-k] * m_k)         (int64, wrapping; x'[t<0] = pad)
    idx[t, j] = mix_n[t] mod p_{l,n,j}             (non-negative, one prime per head)

Heads are laid out [2-gram heads 0..H-1, 3-gram heads 0..H-1, ...] in the last axis.
The numpy and torch paths run the same integer ops and give identical results.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch

PRIME_1 = 10007
_INT64_MAX = np.iinfo(np.int64).max


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for 64-bit integers."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, seen: set[int]) -> int:
    """Smallest prime > start that is not in `seen` (the demo's `find_next_prime`)."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in seen):
        candidate += 1
    return candidate


def head_table_sizes(
    *, layer_ids: list[int], max_ngram_size: int, n_head_per_ngram: int, table_size_per_ngram: list[int]
) -> dict[int, list[list[int]]]:
    """layer -> [per n in 2..N: [per head: distinct prime]], primes unique across all layers."""
    seen: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer in layer_ids:
        per_n = []
        for n in range(2, max_ngram_size + 1):
            start = table_size_per_ngram[n - 2] - 1
            heads = []
            for _ in range(n_head_per_ngram):
                p = next_prime(start, seen)
                seen.add(p)
                heads.append(p)
                start = p
            per_n.append(heads)
        sizes[layer] = per_n
    return sizes


def layer_multipliers(*, seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int) -> np.ndarray:
    """The odd int64 multipliers m_0..m_{N-1} of one layer, shape (N,)."""
    bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(int(seed + PRIME_1 * int(layer_id)))
    return rng.integers(0, bound, size=(max_ngram_size,), dtype=np.int64) * 2 + 1


class NgramHasher:
    """Per-head hash indices of every Engram layer from compressed token ids."""

    def __init__(
        self,
        *,
        compressed_vocab_size: int,
        table_size_per_ngram: list[int],
        max_ngram_size: int,
        n_head_per_ngram: int,
        layer_ids: list[int],
        pad_id: int,
        seed: int,
    ) -> None:
        if compressed_vocab_size <= 0:
            raise ValueError(f"compressed_vocab_size: must be positive, got {compressed_vocab_size}")
        if max_ngram_size < 2:
            raise ValueError(f"max_ngram_size: must be >= 2, got {max_ngram_size}")
        if n_head_per_ngram <= 0:
            raise ValueError(f"n_head_per_ngram: must be positive, got {n_head_per_ngram}")
        if len(table_size_per_ngram) != max_ngram_size - 1 or min(table_size_per_ngram) < 2:
            raise ValueError(f"table_size_per_ngram: need {max_ngram_size - 1} sizes >= 2, got {table_size_per_ngram}")
        if not layer_ids:
            raise ValueError("layer_ids: empty")
        self.compressed_vocab_size = compressed_vocab_size
        self.max_ngram_size = max_ngram_size
        self.n_head_per_ngram = n_head_per_ngram
        self.layer_ids = list(layer_ids)
        self.pad_id = int(pad_id)
        self.table_sizes = head_table_sizes(
            layer_ids=self.layer_ids,
            max_ngram_size=max_ngram_size,
            n_head_per_ngram=n_head_per_ngram,
            table_size_per_ngram=list(table_size_per_ngram),
        )
        self.multipliers = {
            layer: layer_multipliers(
                seed=seed, layer_id=layer, max_ngram_size=max_ngram_size, compressed_vocab_size=compressed_vocab_size
            )
            for layer in self.layer_ids
        }
        # per layer, (max_ngram_size-1) * n_head primes in output order
        self._primes = {
            layer: np.array([p for per_n in self.table_sizes[layer] for p in per_n], dtype=np.int64)
            for layer in self.layer_ids
        }
        self._torch_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def heads_per_layer(self) -> int:
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @overload
    def hash(self, ids: np.ndarray) -> dict[int, np.ndarray]: ...
    @overload
    def hash(self, ids: torch.Tensor) -> dict[int, torch.Tensor]: ...

    def hash(self, ids):  # type: ignore[no-untyped-def]
        """ids: compressed ids [B, T] -> {layer: [B, T, (N-1)*H] int64}, same type and device."""
        if ids.ndim != 2:
            raise ValueError(f"ids: expected shape [B, T], got {tuple(ids.shape)}")
        if isinstance(ids, torch.Tensor):
            return {layer: self._hash_torch(ids, layer) for layer in self.layer_ids}
        return {layer: self._hash_numpy(np.asarray(ids), layer) for layer in self.layer_ids}

    def _hash_numpy(self, ids: np.ndarray, layer: int) -> np.ndarray:
        x = ids.astype(np.int64, copy=False)  # (B, T)
        T = x.shape[1]
        m = self.multipliers[layer]
        shifts = [x] + [
            np.pad(x, ((0, 0), (k, 0)), constant_values=self.pad_id)[:, :T] for k in range(1, self.max_ngram_size)
        ]
        out = []
        H = self.n_head_per_ngram
        primes = self._primes[layer]
        with np.errstate(over="ignore"):
            mix = shifts[0] * m[0]
            for n in range(2, self.max_ngram_size + 1):
                mix = np.bitwise_xor(mix, shifts[n - 1] * m[n - 1])  # (B, T)
                p = primes[(n - 2) * H : (n - 1) * H]  # (H,)
                out.append(mix[:, :, None] % p)  # (B, T, H)
        return np.concatenate(out, axis=2)

    def _torch_consts(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, device)
        if key not in self._torch_cache:
            self._torch_cache[key] = (
                torch.from_numpy(self.multipliers[layer]).to(device),
                torch.from_numpy(self._primes[layer]).to(device),
            )
        return self._torch_cache[key]

    def _hash_torch(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        x = ids.to(torch.int64)  # (B, T)
        T = x.shape[1]
        m, primes = self._torch_consts(layer, x.device)
        padded = torch.nn.functional.pad(x, (self.max_ngram_size - 1, 0), value=self.pad_id)  # (B, T+N-1)
        shifts = [
            padded[:, self.max_ngram_size - 1 - k : self.max_ngram_size - 1 - k + T] for k in range(self.max_ngram_size)
        ]
        H = self.n_head_per_ngram
        out = []
        mix = shifts[0] * m[0]
        for n in range(2, self.max_ngram_size + 1):
            mix = torch.bitwise_xor(mix, shifts[n - 1] * m[n - 1])  # (B, T), int64 wraps like numpy
            p = primes[(n - 2) * H : (n - 1) * H]  # (H,)
            out.append(torch.remainder(mix.unsqueeze(-1), p))  # (B, T, H), sign of divisor -> >= 0
        return torch.cat(out, dim=2)
