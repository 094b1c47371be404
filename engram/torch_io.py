"""Loading torch checkpoints without running code from them.

Every checkpoint this project writes (engram/checkpoint.py, the Ray trainer's dense.pt) holds
tensors and plain data only (dicts, lists, str, int, float, bool, None), so it is read with
`torch.load(weights_only=True)`: an unpickler that builds only those. A file holding any other
pickled object (a class instance, a `__reduce__` that calls a function) is refused with
`UnsafeCheckpoint` before anything in it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds pickled objects other than tensors and plain data."""


def load_checkpoint_file(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    try:
        return torch.load(Path(path), map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpoint(
            f"checkpoint {path}: refused, it holds pickled objects other than tensors and plain data "
            f"(torch.load weights_only=True: {first})"
        ) from None
