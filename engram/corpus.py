"""Corpus files -> documents, and the cache key of anything derived from them.

The default corpus (no `train.corpus` given) is the running interpreter's standard library
source, so every machine has the same kind of data offline. Used by the tokenizer trainer and
the token cache (engram/tokenizer.py, engram/data.py); it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from engram.config import ConfigError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl", ".json")
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ---------------------------------------------------------------------------------------------
# corpus


def _walk(root: Path, suffixes: tuple[str, ...], skip: set[str]) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(suffixes))
    return sorted(out)


def stdlib_files() -> list[Path]:
    """The *.py sources of this interpreter's standard library (no site-packages, no test suites).

    Ordered by a stable hash of the relative path, not alphabetically: `train.max_corpus_mb` keeps a
    prefix and validation is the stream's tail, so alphabetical order would make both a few packages
    (the tail of a 4 MB prefix is `encodings/cp*.py`, formulaic codec tables that flatter n-gram memory).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _walk(root, (".py",), _STDLIB_SKIP)
    return sorted(files, key=lambda f: hashlib.sha1(str(f.relative_to(root)).encode()).hexdigest())


def corpus_files(paths: list[str]) -> list[Path]:
    """Files and folders (recursing for TEXT_SUFFIXES) in the given order; [] -> the stdlib."""
    if not paths:
        files = stdlib_files()
        if not files:
            raise ConfigError(f"train.corpus: empty and no stdlib sources under {sysconfig.get_paths()['stdlib']}")
        return files
    files, seen = [], set()
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ConfigError(f"train.corpus: {raw} does not exist")
        found = _walk(p, TEXT_SUFFIXES, {"__pycache__"}) if p.is_dir() else [p]
        for f in found:
            if f not in seen:
                seen.add(f)
                files.append(f)
    if not files:
        raise ConfigError(f"train.corpus: no {'/'.join(TEXT_SUFFIXES)} files in {paths}")
    return files


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{lineno}: expected an object with a string "text" field')
            yield text


def iter_documents(files: list[Path], max_bytes: int) -> Iterator[str]:
    """Documents in file order until `max_bytes` of UTF-8 text were yielded (the last one cut)."""
    if max_bytes <= 0:
        raise ValueError(f"iter_documents: max_bytes must be positive, got {max_bytes}")
    left = max_bytes
    for path in files:
        for doc in _file_documents(Path(path)):
            if not doc:
                continue
            size = len(doc.encode("utf-8"))
            if size >= left:
                yield doc.encode("utf-8")[:left].decode("utf-8", errors="ignore")
                return
            left -= size
            yield doc


def files_fingerprint(files: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime_ns) per file: the cache key of anything derived from a corpus."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append((str(Path(f).resolve()), st.st_size, st.st_mtime_ns))
    return out


def cache_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def write_code_corpus(path: Path, *, functions: int = 400) -> Path:
    """A small synthetic corpus for tests and benchmarks: repetitive Python-like text with recurring
    n-grams (no downloads); -> path."""
    path.write_text(
        "\n".join(
            f"def function_{i % 17}(self, value):\n    return value * {i % 5} + self.offset_{i % 3}\n"
            for i in range(functions)
        )
    )
    return path
