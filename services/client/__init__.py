"""The shard client used by model workers and the trainer (see client.py for the phases of a lookup)."""

from services.client.client import ShardClient
from services.client.errors import Reason, RetryPolicy, ShardError, error_reason
from services.client.handle import LookupHandle
from services.client.memory import keep_heap
from services.client.ops import ApplyResult

__all__ = [
    "ApplyResult",
    "LookupHandle",
    "Reason",
    "RetryPolicy",
    "ShardClient",
    "ShardError",
    "error_reason",
    "keep_heap",
]
