"""The client's one error type and its retry policy.

Every failure a caller sees is a `ShardError` carrying the gRPC status code, the shard's
message, and which shard (id and address) and call it came from. Retries follow a
`RetryPolicy`: exponential backoff with jitter, only for idempotent calls and only on codes
that say "try again" (UNAVAILABLE, DEADLINE_EXCEEDED while time is left).

`ShardError` pickles with every field (it crosses Ray from a training worker to the driver,
whose message must show the real cause, not a TypeError from rebuilding the exception).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

Code = grpc.StatusCode
RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})


class ShardError(RuntimeError):
    """A shard call failed; `code` is the gRPC status code."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, address: str = "", shard_id: int | None = None, call: str = ""
    ) -> None:
        self.code = code
        self.message = message
        self.address = address
        self.shard_id = shard_id
        self.call = call
        where = f"shard {shard_id}" if shard_id is not None else "shard"
        if address:
            where += f" at {address}"
        super().__init__(f"{call or 'call'} to {where} failed: {code.name}: {message}")

    def __reduce__(self):
        return _rebuild, (type(self), self.code.name, self.message, self.address, self.shard_id, self.call)


def _rebuild(cls: type[ShardError], code: str, message: str, address: str, shard_id: int | None, call: str):
    return cls(Code[code], message, address=address, shard_id=shard_id, call=call)


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


def from_rpc_error(exc: grpc.RpcError, *, address: str, shard_id: int | None, call: str) -> ShardError:
    code = exc.code() if hasattr(exc, "code") else Code.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return ShardError(code or Code.UNKNOWN, details or "(no details)", address=address, shard_id=shard_id, call=call)
