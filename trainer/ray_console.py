"""What a Ray training run prints: one line per durable checkpoint, from Ray Train's controller.

Imported lazily (it subclasses ray.train.UserCallback).
"""

from __future__ import annotations

from typing import Any

from ray.train import Checkpoint, UserCallback


class CheckpointLog(UserCallback):
    """`checkpoint step N: ...` once Ray Train has registered checkpoint N, i.e. once a resume
    would start from it (the controller writes its checkpoint list before calling back)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        if checkpoint is None or not metrics:
            return
        m = metrics[0]  # rank 0's
        print(f"checkpoint step {m['step']}: dense state + {m.get('slot_files', '?')} slot files "
              f"(loss {m['loss']:.4f}, {m['tokens_per_s']:,.0f} tokens/s)", flush=True)
