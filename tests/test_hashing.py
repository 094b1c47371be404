"""The hasher must be bit-compatible with the public demo's NgramHashMapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.hashing import NgramHasher, head_table_sizes, is_prime, layer_multipliers, next_prime


def demo_reference(
    ids: np.ndarray, *, vocab: int, sizes: list[int], N: int, H: int, layers: list[int], pad: int, seed: int
) -> dict[int, np.ndarray]:
    """A literal, loop-by-loop transcription of the demo's formula, written independently of engram.hashing:
    plain Python ints with explicit two's-complement wrapping, trial-division primality."""

    def wrap(v: int) -> int:
        v &= (1 << 64) - 1
        return v - (1 << 64) if v >= 1 << 63 else v

    def prime(n: int) -> bool:
        return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))

    seen: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer in layers:
        primes[layer] = []
        for n in range(2, N + 1):
            start, heads = sizes[n - 2] - 1, []
            for _ in range(H):
                c = start + 1
                while not (prime(c) and c not in seen):
                    c += 1
                seen.add(c)
                heads.append(c)
                start = c
            primes[layer].append(heads)
    out = {}
    B, T = ids.shape
    for layer in layers:
        half = max(1, ((2**63 - 1) // vocab) // 2)
        m = [
            int(v) * 2 + 1
            for v in np.random.default_rng(seed + 10007 * layer).integers(0, half, size=N, dtype=np.int64)
        ]
        res = np.zeros((B, T, (N - 1) * H), dtype=np.int64)
        for b in range(B):
            for t in range(T):
                tok = [int(ids[b, t - k]) if t - k >= 0 else pad for k in range(N)]
                col = 0
                for n in range(2, N + 1):
                    mix = 0
                    for k in range(n):
                        mix = wrap(mix ^ wrap(tok[k] * m[k]))
                    for p in primes[layer][n - 2]:
                        res[b, t, col] = mix % p  # Python's % is non-negative for p > 0
                        col += 1
        out[layer] = res
    return out


def test_primes() -> None:
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(2_147_483_647) and not is_prime(2_147_483_647 * 3)
    assert next_prime(10, set()) == 11 and next_prime(10, {11}) == 13
    assert next_prime(13, set()) == 17  # strictly greater than start


def test_demo_table_sizes() -> None:
    """Demo defaults: table_size_per_ngram = [5*129280]*2, N=3, 8 heads, layers [1, 15]."""
    sizes = head_table_sizes(
        layer_ids=[1, 15], max_ngram_size=3, n_head_per_ngram=8, table_size_per_ngram=[646400, 646400]
    )
    flat = [p for layer in (1, 15) for per_n in sizes[layer] for p in per_n]
    assert len(flat) == len(set(flat)) == 32
    assert all(is_prime(p) for p in flat)
    assert sizes[1][0][0] == next_prime(646399, set())  # the search starts at size - 1
    assert sizes[1][0] == sorted(sizes[1][0])
    # the 3-gram heads of layer 1 continue past the 2-gram heads because primes are unique
    assert sizes[1][1][0] > sizes[1][0][-1]


def test_multipliers_are_odd_and_seeded() -> None:
    m = layer_multipliers(seed=0, layer_id=1, max_ngram_size=3, compressed_vocab_size=100_000)
    assert m.dtype == np.int64 and (m % 2 == 1).all()
    bound = (np.iinfo(np.int64).max // 100_000) // 2
    assert (m >= 1).all() and (m <= 2 * bound).all()
    expected = np.random.default_rng(10007).integers(0, bound, size=3, dtype=np.int64) * 2 + 1
    assert np.array_equal(m, expected)


def test_hand_derived_vector() -> None:
    """One position by hand: t=1, layer 1, 2-gram: mix = (x1*m0) ^ (x0*m1) mod p."""
    h = NgramHasher(
        compressed_vocab_size=50,
        table_size_per_ngram=[101, 101],
        max_ngram_size=3,
        n_head_per_ngram=2,
        layer_ids=[1],
        pad_id=7,
        seed=3,
    )
    m = [int(v) for v in h.multipliers[1]]
    p2 = h.table_sizes[1][0]
    ids = np.array([[4, 9]])
    out = h.hash(ids)[1]
    assert out.shape == (1, 2, 4)
    mix_t1 = (9 * m[0]) ^ (4 * m[1])  # fits in int64 since ids*m < 2^63 by construction of the bound
    assert out[0, 1, 0] == mix_t1 % p2[0] and out[0, 1, 1] == mix_t1 % p2[1]
    mix_t0 = (4 * m[0]) ^ (7 * m[1])  # position 0 sees the pad id before the start
    assert out[0, 0, 0] == mix_t0 % p2[0]


@pytest.mark.parametrize("N,H,layers,seed", [(2, 1, [1], 0), (3, 2, [1, 4], 0), (4, 3, [2], 11)])
def test_equals_demo_formula_numpy_and_torch(N: int, H: int, layers: list[int], *, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = 3000
    sizes = [int(s) for s in rng.integers(50, 500, size=N - 1)]
    ids = rng.integers(0, vocab, size=(3, 17))
    ids[0, :5] = vocab - 1  # the largest id: the products come closest to int64's limit
    h = NgramHasher(
        compressed_vocab_size=vocab,
        table_size_per_ngram=sizes,
        max_ngram_size=N,
        n_head_per_ngram=H,
        layer_ids=layers,
        pad_id=2,
        seed=seed,
    )
    ref = demo_reference(ids, vocab=vocab, sizes=sizes, N=N, H=H, layers=layers, pad=2, seed=seed)
    got_np = h.hash(ids)
    got_t = h.hash(torch.from_numpy(ids))
    for layer in layers:
        assert got_np[layer].dtype == np.int64
        np.testing.assert_array_equal(got_np[layer], ref[layer])
        assert isinstance(got_t[layer], torch.Tensor) and got_t[layer].dtype == torch.int64
        np.testing.assert_array_equal(got_t[layer].numpy(), ref[layer])
        for col, p in enumerate(p for per_n in h.table_sizes[layer] for p in per_n):
            assert (ref[layer][..., col] >= 0).all() and (ref[layer][..., col] < p).all()


def test_products_of_valid_ids_fit_in_int64() -> None:
    """The multiplier bound keeps x * m_k inside int64 for every valid compressed id, so numpy, torch
    CPU and CUDA agree without relying on overflow behaviour."""
    for vocab in (2, 3000, 129280):
        m = layer_multipliers(seed=5, layer_id=15, max_ngram_size=4, compressed_vocab_size=vocab)
        assert int(m.max()) * (vocab - 1) <= 2**63 - 1


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine (GPU check runs on the device box)"
)
def test_cuda_equals_numpy() -> None:
    h = NgramHasher(
        compressed_vocab_size=100_000,
        table_size_per_ngram=[646400, 646400],
        max_ngram_size=3,
        n_head_per_ngram=8,
        layer_ids=[1, 15],
        pad_id=2,
        seed=0,
    )
    ids = np.random.default_rng(0).integers(0, 100_000, size=(8, 512))
    cpu = h.hash(ids)
    gpu = h.hash(torch.from_numpy(ids).cuda())
    for layer in (1, 15):
        assert gpu[layer].device.type == "cuda"
        np.testing.assert_array_equal(gpu[layer].cpu().numpy(), cpu[layer])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="compressed_vocab_size"):
        NgramHasher(
            compressed_vocab_size=0,
            table_size_per_ngram=[11],
            max_ngram_size=2,
            n_head_per_ngram=1,
            layer_ids=[1],
            pad_id=0,
            seed=0,
        )
    with pytest.raises(ValueError, match="table_size_per_ngram"):
        NgramHasher(
            compressed_vocab_size=10,
            table_size_per_ngram=[11],
            max_ngram_size=3,
            n_head_per_ngram=1,
            layer_ids=[1],
            pad_id=0,
            seed=0,
        )
    h = NgramHasher(
        compressed_vocab_size=10,
        table_size_per_ngram=[11],
        max_ngram_size=2,
        n_head_per_ngram=1,
        layer_ids=[1],
        pad_id=0,
        seed=0,
    )
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        h.hash(np.zeros(5, dtype=np.int64))
