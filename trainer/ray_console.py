"""The main job's console during Ray training: one progress bar and a few lines, drawn by the driver.

Ray forwards every worker's and the controller's output to the driver by default: a raw dump
of each reported metrics dictionary, "PlacementGroupCleaner" notices, one tqdm per worker with a
"(RayTrainWorker pid=...)" prefix. Instead the driver starts Ray with `log_to_driver=False` (that
output stays in Ray's log files, /tmp/ray/session_latest/logs on a local instance) and Ray Train
logs at WARNING on the console. What the user sees travels on a Ray queue:

    rank 0 (QueueBar, trainer.loop's bar) --step / line events--> Queue --> driver thread (DriverConsole)
    Ray Train controller (CheckpointLog) --"checkpoint step N" once registered-->/

Imported lazily: it needs Ray.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

from ray.train import Checkpoint, UserCallback
from ray.util.queue import Empty, Queue
from tqdm import tqdm


def new_queue() -> Queue:
    return Queue(actor_options={"num_cpus": 0})  # takes no CPU from the workers' placement


class QueueBar:
    """trainer.loop's progress bar on a Ray worker: its updates and lines go to the driver."""

    def __init__(self, queue: Queue, steps: range, *, enabled: bool) -> None:
        self.queue, self.steps, self.enabled = queue, steps, enabled
        self.step = steps.start

    def __iter__(self) -> Iterator[int]:
        for step0 in self.steps:
            self.step = step0 + 1
            yield step0

    def set_postfix(self, post: dict) -> None:
        if self.enabled:
            self.queue.put_nowait({"step": self.step, "postfix": post})

    def write(self, line: str) -> None:
        self.queue.put_nowait({"line": line})

    def close(self) -> None:
        pass


class CheckpointLog(UserCallback):
    """`checkpoint step N: ...` once Ray Train has registered checkpoint N, i.e. once a resume
    would start from it (the controller writes its checkpoint list before calling back)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        if checkpoint is None or not metrics:
            return
        m = metrics[0]  # rank 0's
        self.queue.put_nowait(
            {
                "line": f"checkpoint step {m['step']}: dense state + {m.get('slot_files', '?')} "
                f"slot files (loss {m['loss']:.4f}, {m['tokens_per_s']:,.0f} tokens/s)"
            }
        )


class DriverConsole:
    """The driver's side: a thread drains the queue into one tqdm bar and printed lines."""

    def __init__(self, queue: Queue, *, label: str, start: int, total: int, show_bar: bool) -> None:
        self.queue = queue
        self.bar = tqdm(total=total, initial=start, desc=label, disable=not show_bar, dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-console", daemon=True)

    def __enter__(self) -> DriverConsole:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for event in self.queue.get_nowait_batch(self.queue.qsize()):  # what arrived since the last get
            self._show(event)
        self.bar.close()
        self.queue.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=0.5)
            except Empty:
                continue
            self._show(event)

    def _show(self, event: dict) -> None:
        if "line" in event:
            self.bar.write(event["line"])  # tqdm.write: printed above the bar, on stdout
            sys.stdout.flush()
            return
        self.bar.n = event["step"]
        self.bar.set_postfix(event["postfix"])
