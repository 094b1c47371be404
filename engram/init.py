"""Deterministic table initialisation from (seed, layer, row).

Every row's values depend only on (seed, layer, row, column), never on which shard holds
the row or in which order rows are materialised, so any shard layout and the local table
start identical. Counter-based: splitmix64 of the coordinates -> two uniforms -> Box-Muller.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def init_rows(*, seed: int, layer_id: int, rows: np.ndarray, dim: int, std: float) -> np.ndarray:
    """rows: (R,) global row ids -> (R, dim) float32 ~ N(0, std^2)."""
    rows = np.asarray(rows, dtype=np.int64).astype(np.uint64)
    stream = _splitmix64(np.array([seed * 1_000_003 + layer_id], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        counter = (rows[:, None] * np.uint64(dim) + np.arange(dim, dtype=np.uint64)[None, :]) * np.uint64(2)
        a = _splitmix64(counter ^ stream)
        b = _splitmix64((counter + np.uint64(1)) ^ stream)
    # 53-bit uniforms in (0, 1]
    u1 = ((a >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)
    u2 = (b >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (z * std).astype(np.float32)
