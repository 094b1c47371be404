"""The shard's errors: `ShardError` (services/errors.py, the one error type) and its shorthands.

The store, checkpoint and migration code raise `ShardError` with a `Reason`; the servicer only
translates it into a rich status (`services.errors.abort`). Nothing that raises it has changed
any table state.
"""

from __future__ import annotations

from services.errors import Code, Reason, ShardError


def invalid(message: str, reason: Reason = Reason.BAD_REQUEST) -> ShardError:
    return ShardError(Code.INVALID_ARGUMENT, message, reason=reason)


def precondition(message: str, reason: Reason) -> ShardError:
    return ShardError(Code.FAILED_PRECONDITION, message, reason=reason)


def unavailable(message: str, reason: Reason) -> ShardError:
    return ShardError(Code.UNAVAILABLE, message, reason=reason)


class BootError(Exception):
    """A shard cannot start (control plane down or not initialised, bad checkpoint, port in use)."""


__all__ = ["BootError", "Code", "Reason", "ShardError", "invalid", "precondition", "unavailable"]
