"""What the mixins of `ShardClient` (push.py, checkpoints.py, ops.py) use of it, for the type checker.

`ShardClient` (services/client/client.py) sets these attributes and defines these methods; the
declarations below exist only for mypy and add nothing at run time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

    from engram.config import Config
    from engram.config_schema import SecurityConfig
    from engram.layout import TableLayout
    from services.client.channels import Endpoint
    from services.client.errors import RetryPolicy
    from services.client.handle import LookupHandle
    from services.client.state import Routing

T = TypeVar("T")


class ClientBase:
    cfg: Config
    control: Any  # services.control.ControlPlane | None
    layouts: dict[int, TableLayout]
    retry: RetryPolicy
    timeout_s: float
    max_message_bytes: int
    wire_dtype: str
    security: SecurityConfig  # this process's certificates or token
    _routing: Routing

    if TYPE_CHECKING:

        async def _call(
            self,
            shard_id: int,
            call: str,
            invoke: Callable[[Endpoint, float], Awaitable[T]],
            *,
            routing: Routing,
            deadline: float,
            idempotent: bool,
        ) -> T: ...

        async def _newer_than(self, epoch: int) -> bool: ...

        async def refresh(self) -> int: ...

        def layout(self, table: int) -> TableLayout: ...

        def lookup(
            self,
            table: int,
            row_ids: np.ndarray | torch.Tensor,
            *,
            upcast: bool = False,
            timeout_s: float | None = None,
            dedup_ids: bool = True,
            step: int = 0,
            max_staleness: int = 0,
        ) -> LookupHandle: ...

        async def stats(
            self, shard_ids: list[int] | None = None, *, timeout_s: float = 5.0, errors: str = "raise"
        ) -> dict[int, Any]: ...

        async def close(self) -> None: ...

        @property
        def epoch(self) -> int: ...

        @property
        def owners(self) -> list[int]: ...

        @property
        def addresses(self) -> dict[int, str]: ...
