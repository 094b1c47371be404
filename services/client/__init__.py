"""The shard client used by model workers and the trainer (see client.py for the phases of a lookup)."""

from services.client.client import ShardClient
from services.client.errors import RetryPolicy, ShardError
from services.client.handle import LookupHandle
from services.client.memory import keep_heap
from services.client.ops import ApplyResult

__all__ = ["ApplyResult", "LookupHandle", "RetryPolicy", "ShardClient", "ShardError", "keep_heap"]
