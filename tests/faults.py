"""Faults that tests inject into a training run from outside the production loop.

`train_ray(..., on_step=ExitAfter(13))`: trainer.loop calls the hook in every Ray worker after
each step; this one makes worker `rank` die without any cleanup (as a SIGKILL or a lost node
would) right after it pushed its part of step `step`. The class lives in a small module of its
own, so that Ray's workers import it by name without importing a test module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ExitAfter:
    step: int
    rank: int = 0

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank:
            os._exit(1)
