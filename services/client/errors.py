"""The client's errors and its retry policy.

Every failure a caller sees is a `ShardError` (services/errors.py, the one error type of the
services) carrying the gRPC status code, the shard's reason and message, and which shard (id
and address) and call it came from. Retries follow a `RetryPolicy`: exponential backoff with
jitter, only for idempotent calls and only on codes that say "try again" (UNAVAILABLE,
DEADLINE_EXCEEDED while time is left).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from services.errors import Code, Reason, ShardError, error_reason, from_rpc_error

RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 6  # per call, first try included
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    max_refreshes: int = 4  # slot-map refreshes per call on stale-epoch errors

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number `attempt` (1-based): half fixed, half uniform jitter."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, attempt - 1))
        return cap / 2 + (rng or random).uniform(0, cap / 2)


__all__ = ["RETRYABLE", "Code", "Reason", "RetryPolicy", "ShardError", "error_reason", "from_rpc_error"]
