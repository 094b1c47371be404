"""The one training loop: local training and every Ray worker run it.

    for each step:  sample the global batch (one ahead, so a remote backend prefetches its rows)
                    -> backend.train_step -> fault hooks (tests) -> eval -> checkpoint

What differs between local and distributed training sits behind two seams:

- the step backend (`StepBackend`): where the Engram rows live and how they are updated.
  `trainer.local.LocalStep`: the model's own tables and its lazy Adam, W-way gradient
  accumulation. `trainer.remote_step.RemoteStep`: prefetched lookups from the memory shards and
  sparse-gradient pushes to them.
- the gradient-sync strategy (`GradSync`): `NoSync` in one process, `DDPSync` across Ray workers
  (DDP all-reduce of the dense gradients, mean of the loss and of the timings).

The checkpointer (`Checkpointer`) writes what the run needs to resume: a local checkpoint file,
or a Ray Train checkpoint holding the dense state and the shards' manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from engram.config import Config
from engram.data import TokenDataset
from trainer.step import StepOut

LOSS_READ_EVERY = 10  # steps between reads of the training loss (each read waits for the device)

StepHook = Callable[[int, int], None]  # (1-based step just trained, rank): fault injection in tests
Batches = Sequence[tuple[np.ndarray, np.ndarray]]


class Bar(Protocol):
    """The loop's progress display: a tqdm, or trainer.ray_console.QueueBar on a Ray worker."""

    def __iter__(self) -> Iterator[int]: ...

    def set_postfix(self, post: dict) -> None: ...

    def write(self, line: str) -> None: ...

    def close(self) -> None: ...


BarFactory = Callable[..., Bar]  # (steps: range, *, desc: str, enabled: bool) -> Bar


def console_bar(steps: range, *, desc: str, enabled: bool) -> Bar:
    return tqdm(steps, disable=not enabled, desc=desc, mininterval=1.0, dynamic_ncols=True)  # type: ignore[return-value]


class StepBackend(Protocol):
    """One optimizer step and one evaluation, wherever the rows live."""

    rows_remote: bool

    def train_step(
        self, step0: int, x_BT: np.ndarray, y_BT: np.ndarray, *, next_x: np.ndarray | None = None
    ) -> StepOut: ...

    def evaluate(self, batches: Batches, step: int) -> float: ...

    def settle(self, step: int) -> None: ...

    def close(self) -> None: ...


class GradSync:
    """No gradient sync: one process trains the whole global batch."""

    rank, world = 0, 1

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model  # what the step's forward runs through

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the mean of `t` over the workers (here: `t`)."""
        return t

    def barrier(self) -> None:
        pass


NoSync = GradSync


class DDPSync(GradSync):
    """Data-parallel workers: DDP averages the dense gradients; losses and timings are averaged too."""

    def __init__(self, model: torch.nn.Module, *, device: str) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.module = DistributedDataParallel(
            model, device_ids=[torch.device(device)] if device.startswith("cuda") else None
        )

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        t /= self.world
        return t

    def barrier(self) -> None:
        dist.barrier()


@dataclass
class LoopStats:
    """Where the loop stands: what a checkpoint reports and the run's result is built from."""

    step: int
    history: dict  # {"train_losses": [float], "val_losses": [(step, float)]}
    tokens: int = 0
    wall_s: float = 0.0
    timings: np.ndarray = field(default_factory=lambda: np.zeros(3))  # seconds (lookup, compute, push), this worker
    last_loss: float = float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.wall_s, 1e-9)


class Checkpointer(Protocol):
    def save(self, stats: LoopStats, *, final: bool) -> None: ...


def mean_timings(stats: LoopStats, sync: GradSync) -> dict:
    """Blocked-on-the-shards time (lookups + pushes), as the mean over the workers."""
    mean = torch.tensor([*stats.timings.tolist(), stats.wall_s], dtype=torch.float64)  # (lookup, compute, push, wall)
    sync.mean_(mean)
    lookup, compute, push, wall = mean.tolist()
    return {
        "lookup": lookup,
        "compute": compute,
        "push": push,
        "wall": wall,
        "blocked": lookup + push,
        "blocked_fraction": (lookup + push) / max(wall, 1e-9),
    }


def _read(pending: list) -> list[float]:
    """One device -> host read for the losses since the last (the CPU runs ahead in between)."""
    if pending and all(isinstance(v, torch.Tensor) for v in pending):
        return torch.stack(pending).tolist()
    return [float(v) for v in pending]


def run_loop(
    *,
    cfg: Config,
    backend: StepBackend,
    dataset: TokenDataset,
    checkpointer: Checkpointer,
    sync: GradSync,
    start: int = 0,
    history: dict | None = None,
    label: str = "train",
    stop_at: int | None = None,
    on_step: StepHook | None = None,
    make_bar: BarFactory = console_bar,
) -> LoopStats:
    """Train steps start+1 .. train.steps (or `stop_at`) -> the loop's statistics.

    The batch sequence is the one `train.seed` gives: a resumed run replays the sampler first.
    `stop_at` ends the run early, after that step's checkpoint. `on_step(step, rank)` runs after
    each step's update (tests inject faults there). `make_bar` draws the progress (rank 0).
    """
    t = cfg.train
    history = history if history is not None else {"train_losses": [], "val_losses": []}
    stats = LoopStats(step=start, history=history)
    rng = np.random.default_rng(t.seed)
    for _ in range(start):  # replay the sampler: a resumed run sees the same batches
        dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng)
    eval_batches = list(
        dataset.iter_eval_batches("val", batch_size=t.batch_size, seq_len=t.seq_len, num_batches=t.eval_batches)
    )
    bar = make_bar(range(start, t.steps), desc=label, enabled=sync.rank == 0 and t.progress)
    pending: list = []  # losses of the steps since the last read (device tensors or floats)

    def read_losses() -> None:
        history["train_losses"].extend(_read(pending))
        pending.clear()
        if history["train_losses"]:
            stats.last_loss = history["train_losses"][-1]

    t0 = time.perf_counter()
    nxt = dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng) if start < t.steps else None
    for step0 in bar:
        assert nxt is not None
        x, y = nxt  # (B, T) global batch
        nxt = (
            dataset.batch("train", batch_size=t.batch_size, seq_len=t.seq_len, rng=rng) if step0 + 1 < t.steps else None
        )
        out = backend.train_step(step0, x, y, next_x=None if nxt is None or not cfg.dist.prefetch else nxt[0])
        done = stats.step = step0 + 1
        if on_step is not None:
            on_step(done, sync.rank)
        pending.append(out.loss)
        stats.tokens += out.tokens
        stats.timings += (out.lookup_s, out.compute_s, out.push_s)
        stats.wall_s = time.perf_counter() - t0
        last = done == t.steps or (stop_at is not None and done >= stop_at)
        if done % LOSS_READ_EVERY == 0 or last:
            read_losses()
            post = {"loss": f"{stats.last_loss:.3f}", "lr": f"{out.lr:.1e}", "tok_s": f"{stats.tokens_per_s:,.0f}"}
            if backend.rows_remote:
                post |= {"stale": str(out.staleness), "blocked": f"{stats.timings[0] + stats.timings[2]:.1f}s"}
            bar.set_postfix(post)
        if done % t.eval_every == 0 or done == t.steps:
            history["val_losses"].append((done, backend.evaluate(eval_batches, done)))
            if sync.rank == 0:
                bar.write(f"{label} step {done}: val loss {history['val_losses'][-1][1]:.4f}")
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or last:
            read_losses()
            stats.wall_s = time.perf_counter() - t0
            checkpointer.save(stats, final=last)
        if last:
            break
    bar.close()
    read_losses()
    stats.wall_s = time.perf_counter() - t0
    return stats
