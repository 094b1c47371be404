"""The small synthetic code corpus the training tests write for themselves (no downloads)."""

from engram.corpus import write_code_corpus

__all__ = ["write_code_corpus"]
