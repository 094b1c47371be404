"""Measured n-gram statistics of the default corpus: the Zipf exponent the capacity planner uses.

    python -m benchmarks.ngram_stats --preset cpu --json benchmarks/results/ngram_stats_default-corpus.json

Tokenizes the corpus of the preset (the default: Python's stdlib, through the cached BPE),
compresses the ids as Engram does, counts every n-gram of order 2..4 and fits
log(count) = c - s * log(rank) on log-spaced ranks from 10 down to where counts fall to 5
(the head and the hapax tail both bend away from a power law). `engram.capacity.MEASURED_ZIPF`
holds the printed exponents; re-run this script and update it when the corpus changes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.machine import write_report
from engram.config import load_config
from engram.data import prepare_data


def ngram_counts(ids: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Counts of every distinct n-gram of `ids` (values < 2^bits), sorted descending."""
    T = ids.size - n + 1
    key = np.zeros(T, dtype=np.uint64)
    for k in range(n):
        key = (key << np.uint64(bits)) | ids[k : k + T].astype(np.uint64)
    _, counts = np.unique(key, return_counts=True)
    return np.sort(counts)[::-1]


def fit_zipf(counts: np.ndarray, *, min_rank: int = 10, min_count: int = 5) -> tuple[float, int]:
    """Least-squares slope of log count vs log rank on log-spaced ranks; -> (s, last rank used)."""
    last = int(np.searchsorted(-counts, -min_count, side="right"))  # ranks with count >= min_count
    if last <= min_rank * 4:
        raise ValueError(f"too few n-grams with count >= {min_count} to fit a power law ({last})")
    ranks = np.unique(np.geomspace(min_rank, last, 200).astype(np.int64))
    slope, _ = np.polyfit(np.log(ranks), np.log(counts[ranks - 1]), 1)
    return float(-slope), last


def measure(preset: str, overrides: list[str]) -> dict:
    cfg = load_config(preset, overrides=overrides)
    _, vocab, data = prepare_data(cfg)
    ids = vocab(np.asarray(data.train))  # compressed ids, as hashed
    bits = int(np.ceil(np.log2(vocab.size)))
    orders = {}
    for n in (2, 3, 4):
        counts = ngram_counts(ids, n, bits)
        s, last = fit_zipf(counts)
        orders[n] = {
            "zipf_exponent": round(s, 4),
            "distinct": int(counts.size),
            "fit_ranks": [10, last],
            "top_share": float(counts[:1000].sum() / counts.sum()),
        }
    return {
        "preset": preset,
        "corpus": cfg.train.corpus or "python stdlib (default)",
        "max_corpus_mb": cfg.train.max_corpus_mb,
        "tokens": int(ids.size),
        "vocab": vocab.vocab_size,
        "compressed_vocab": vocab.size,
        "orders": orders,
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = measure(args.preset, args.overrides)
    print(f"{report['tokens']:,} tokens, |V| {report['vocab']} -> |V'| {report['compressed_vocab']}")
    print(f"{'order':>5} {'zipf s':>7} {'distinct':>10} {'top-1000 share':>15}")
    for n, o in report["orders"].items():
        print(f"{n:>5} {o['zipf_exponent']:>7.3f} {o['distinct']:>10,} {o['top_share']:>15.3f}")
    if args.json:
        write_report(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
