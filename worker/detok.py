"""Incremental detokenisation and stop strings: each new token decodes a few ids, not the sequence.

The offsets scheme of vLLM: `prefix` is text already emitted from ids[prefix_offset:read_offset];
a new token decodes ids[prefix_offset:] and emits what goes beyond the prefix, unless the
text ends in an incomplete UTF-8 sequence (U+FFFD), in which case it waits for more ids.
A few prompt ids start the window so that a leading space or merge decodes as in context.

`StopText` holds back the tail of the output that could still become a stop string, so a
stop string is never partly streamed.
"""

from __future__ import annotations

from tokenizers import Tokenizer

CONTEXT_IDS = 5


class IncrementalDetokenizer:
    def __init__(self, tok: Tokenizer, prompt_ids: list[int]) -> None:
        self.tok = tok
        self.ids = list(prompt_ids[-CONTEXT_IDS:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def push(self, token_id: int) -> str:
        """-> the text this token completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tok.decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]


class StopText:
    """Output text with stop strings: `push(delta)` -> (text safe to emit, stopped)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of `text` already handed out

    def push(self, delta: str) -> tuple[str, bool]:
        self.text += delta
        cut = min(
            (i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            out, self.emitted = self.text[self.emitted : cut], cut
            self.text = self.text[:cut]
            return out, True
        hold = 0
        for s in self.stops:  # the longest suffix that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out, False

    def flush(self) -> str:
        """At the end (not stopped): whatever was held back."""
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out
