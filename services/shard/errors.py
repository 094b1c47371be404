"""The one error type of the shard: a gRPC status code plus a message saying what was wrong.

The store, checkpoint and migration code raise `ShardError`; the servicer only translates it
into `context.abort(code, message)`. Nothing that raises it has changed any table state.
"""

from __future__ import annotations

import grpc

Code = grpc.StatusCode


class ShardError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __reduce__(self):  # picklable with its code (Exception's default would call __init__(message))
        return _rebuild, (type(self), self.code.name, self.message)


def _rebuild(cls: type[ShardError], code: str, message: str) -> ShardError:
    return cls(Code[code], message)


def invalid(message: str) -> ShardError:
    return ShardError(Code.INVALID_ARGUMENT, message)


def precondition(message: str) -> ShardError:
    return ShardError(Code.FAILED_PRECONDITION, message)


def unavailable(message: str) -> ShardError:
    return ShardError(Code.UNAVAILABLE, message)


class BootError(Exception):
    """A shard cannot start (control plane down or not initialised, bad checkpoint, port in use)."""
