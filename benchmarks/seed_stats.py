"""Summary statistics over seeds: mean, spread and a t-distribution 95% interval for the mean."""

from __future__ import annotations

import math

# two-sided 95% quantiles t_{0.975, df} of Student's t, df = 1..30 (beyond: the normal 1.96 is within 2%)
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"df: a t interval needs >= 2 samples (df >= 1), got df={df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def summarize(values: list[float]) -> dict:
    """{n, mean, std (sample), min, max, ci95: [lo, hi] or None for a single value}."""
    n = len(values)
    if n == 0:
        raise ValueError("values: empty")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    ci = None
    if n > 1:
        half = t975(n - 1) * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values), "ci95": ci}
