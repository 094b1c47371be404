"""Dynamic batching of concurrent requests: a queue and one batcher task.

Handlers `await batcher.submit(work)`. The batcher task takes the first queued item, then
waits up to `timeout_ms` for more, up to `max_batch` items, and runs the whole batch in one
model call on a single worker thread (the event loop never runs the model). Every item of
a batch gets its own result; if the model call raises, every item of that batch gets the
exception. A cancelled caller's item is dropped if it has not run yet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
from collections.abc import Callable
from typing import Generic, TypeVar

W = TypeVar("W")
R = TypeVar("R")


class DynamicBatcher(Generic[W, R]):
    def __init__(
        self,
        run: Callable[[list[W]], list[R]],
        *,
        max_batch: int,
        timeout_ms: float,
        executor: cf.ThreadPoolExecutor | None = None,
    ) -> None:
        """`executor`: the model thread to run on (shared with the generation engine); owned if None."""
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        self._run, self.max_batch, self.timeout_s = run, max_batch, timeout_ms / 1000.0
        self._queue: asyncio.Queue[tuple[W, asyncio.Future[R]]] = asyncio.Queue()
        self._owns_executor = executor is None
        self._executor = executor or cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-model")
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: list[int] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engram-batcher")

    async def submit(self, work: W) -> R:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((work, fut))
        return await fut

    async def _collect(self) -> list[tuple[W, asyncio.Future[R]]]:
        items = [await self._queue.get()]
        deadline = time.monotonic() + self.timeout_s
        while len(items) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                items.append(self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        return [(w, f) for w, f in items if not f.done()]  # drop callers that were cancelled meanwhile

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            if not items:
                continue
            self.batch_sizes.append(len(items))
            try:
                results = await loop.run_in_executor(self._executor, self._run, [w for w, _ in items])
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(items, results):
                if not fut.done():
                    fut.set_result(res)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._owns_executor:
            self._executor.shutdown(wait=True)
