"""trainer.loop on its own (a pure unit test): a recording step backend and checkpointer, a real
TokenDataset over a small array. What the loop owns is checked here: which batches each step
sees (also after a resume), the next batch handed over for prefetching, the eval and checkpoint
cadence, `stop_at`, the fault hook, and the loss/timing bookkeeping. The backends themselves run
in tests/test_train_local.py (local rows) and tests/test_remote_training.py (remote rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.config import load_config
from engram.data import TokenDataset
from trainer.loop import LoopStats, NoSync, run_loop
from trainer.step import StepOut


class Recorder:
    rows_remote = False

    def __init__(self) -> None:
        self.steps: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        self.evals: list[int] = []

    def train_step(self, step0, x_BT, y_BT, *, next_x=None):  # type: ignore[no-untyped-def]
        assert np.array_equal(x_BT[:, 1:], y_BT[:, :-1])  # y is x shifted by one
        self.steps.append((step0, x_BT.copy(), None if next_x is None else next_x.copy()))
        return StepOut(loss=torch.tensor(float(step0)), tokens=x_BT.size, lookup_s=0.5, compute_s=1.0, push_s=0.25)

    def evaluate(self, batches, step):  # type: ignore[no-untyped-def]
        assert len(batches) == 2
        self.evals.append(step)
        return 10.0 - step

    def settle(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Checkpoints:
    def __init__(self) -> None:
        self.saved: list[tuple[int, bool, list[float]]] = []

    def save(self, stats: LoopStats, *, final: bool) -> None:
        self.saved.append((stats.step, final, list(stats.history["train_losses"])))


def run(*, steps: int = 12, start: int = 0, history: dict | None = None, **kw):  # type: ignore[no-untyped-def]
    cfg = load_config(
        "tiny",
        None,
        [
            f"train.steps={steps}",
            "train.eval_every=5",
            "train.checkpoint_every=4",
            "train.eval_batches=2",
            "train.batch_size=4",
            "train.seq_len=8",
            "train.progress=false",
            "train.seed=7",
        ],
    )
    data = TokenDataset(train=np.arange(1000, dtype=np.uint16), val=np.arange(200, dtype=np.uint16), vocab_size=1000)
    backend, ckpt = Recorder(), Checkpoints()
    stats = run_loop(
        cfg=cfg,
        backend=backend,
        dataset=data,
        checkpointer=ckpt,
        sync=NoSync(torch.nn.Linear(1, 1)),
        start=start,
        history=history,
        **kw,
    )
    return backend, ckpt, stats


def test_cadence_batches_and_bookkeeping() -> None:
    backend, ckpt, stats = run()
    assert [s for s, _, _ in backend.steps] == list(range(12))
    for (_, _, nxt), (_, x, _) in zip(backend.steps, backend.steps[1:]):
        assert nxt is not None and np.array_equal(nxt, x)  # the next step's batch, for the prefetch
    assert backend.steps[-1][2] is None
    assert len({x.tobytes() for _, x, _ in backend.steps}) == 12  # a fresh batch every step
    assert backend.evals == [5, 10, 12]
    assert stats.history["val_losses"] == [(5, 5.0), (10, 0.0), (12, -2.0)]
    assert [(s, f) for s, f, _ in ckpt.saved] == [(4, False), (8, False), (12, True)]
    assert ckpt.saved[0][2] == [0.0, 1.0, 2.0, 3.0]  # the losses are read before each checkpoint
    assert stats.history["train_losses"] == [float(s) for s in range(12)]
    assert stats.step == 12 and stats.tokens == 12 * 4 * 8
    np.testing.assert_allclose(stats.timings, [12 * 0.5, 12 * 1.0, 12 * 0.25])


def test_resume_replays_the_sampler_and_stop_at_checkpoints() -> None:
    full, _, _ = run()
    stopped, ckpt, stats = run(stop_at=6)
    assert [s for s, _, _ in stopped.steps] == list(range(6))
    assert [(s, f) for s, f, _ in ckpt.saved] == [(4, False), (6, True)]  # stop_at: a checkpoint there
    resumed, _, after = run(start=6, history={"train_losses": list(stats.history["train_losses"]), "val_losses": []})
    assert [s for s, _, _ in resumed.steps] == list(range(6, 12))
    for (_, a, _), (_, b, _) in zip(full.steps[6:], resumed.steps):
        assert np.array_equal(a, b)  # the same batches as the uninterrupted run
    assert after.history["train_losses"] == [float(s) for s in range(12)]


def test_the_fault_hook_runs_after_each_step_and_its_error_stops_the_loop() -> None:
    seen: list[tuple[int, int]] = []

    def hook(step: int, rank: int) -> None:
        seen.append((step, rank))
        if step == 3:
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        run(on_step=hook)
    assert seen == [(1, 0), (2, 0), (3, 0)]
