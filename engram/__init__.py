"""Engram conditional memory: pure model math and addressing (no network, Redis, Ray or tracing).

Importing it asks Intel MKL for its strict reproducibility mode (`MKL_CBWR=AUTO,STRICT`, unless the
environment already says otherwise): MKL's CPU matmuls then give the same bits at any thread
count. Without it MKL splits a matmul's inner dimension across threads on AVX-512 Intel CPUs (not
on AMD), so a 2-thread run differs from a 1-thread run in the last bits (tests/test_determinism.py).
MKL reads the setting at its first call, so it holds when engram is imported before any matmul.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
