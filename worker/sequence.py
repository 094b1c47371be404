"""One generation request inside the engine: its parameters, window, cache state and row tickets."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from engram.decode import SeqState
from worker.detok import IncrementalDetokenizer, StopText
from worker.prefetch import PrefetchHandle

_ids = itertools.count(1)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token (None = off, 0 = only the chosen token)
    ignore_eot: bool = False


@dataclass(slots=True)
class EngramOptions:
    """Diagnostics from the paper: switch the memory off, or see its gates."""

    knockout: bool = False  # the Engram branch adds nothing (Y = 0) for this request
    return_gates: bool = False  # alpha per generated token and Engram layer


@dataclass(slots=True)
class TokenEvent:
    index: int
    token_id: int
    text: str  # new text (stop strings held back and cut)
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None
    gates: dict[int, list[float]] | None = None  # layer -> alpha per branch, at the input that produced it
    finish_reason: str | None = None  # stop | length | None while running


@dataclass(slots=True)
class ErrorEvent:
    message: str
    unavailable: bool = False  # rows did not arrive (503) rather than a bug (500)


class RowTicket:
    """Rows in flight for window positions t0.. of one sequence: row b of a batch handle."""

    def __init__(self, handle: PrefetchHandle, b: int, t0: int) -> None:
        self.handle, self.b, self.t0 = handle, b, t0

    def rows(self, layer: int, start: int, count: int) -> torch.Tensor:
        """Window positions start..start+count-1 -> (count, Hn, dh)."""
        er = self.handle.rows(layer)
        return er.rows[er.inverse[self.b, start - self.t0 : start - self.t0 + count]]


class Sequence:
    def __init__(
        self,
        *,
        prompt_ids: list[int],
        params: SamplingParams,
        options: EngramOptions,
        tok: Tokenizer,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.id = next(_ids)
        self.prompt_len = len(prompt_ids)
        self.tokens = list(prompt_ids)  # the model's window: prompt + generated (shifted past the context)
        self.params, self.options = params, options
        self.state = SeqState()
        self.ticket: RowTicket | None = None
        self.generated: list[int] = []
        self.gen = torch.Generator().manual_seed(params.seed)
        self.detok = IncrementalDetokenizer(tok, prompt_ids)
        self.stop_text = StopText(params.stop)
        self.events: asyncio.Queue[TokenEvent | ErrorEvent] = asyncio.Queue()
        self.loop = loop
        self.cancelled = False  # set from the event loop; the engine thread frees the blocks
        self.finished = False
        self.last_gates: dict[int, list[float]] | None = None
        self.submitted_at = time.monotonic()

    @property
    def pending(self) -> int:
        """Window tokens not yet in the KV cache."""
        return len(self.tokens) - self.state.length
