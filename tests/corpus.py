"""The small synthetic code corpus the training tests write for themselves (no downloads)."""

from __future__ import annotations

from pathlib import Path


def write_code_corpus(path: Path, *, functions: int = 400) -> Path:
    """Repetitive Python-like text with recurring n-grams; -> path."""
    path.write_text("\n".join(
        f"def function_{i % 17}(self, value):\n    return value * {i % 5} + self.offset_{i % 3}\n"
        for i in range(functions)
    ))
    return path
