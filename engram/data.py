"""Corpus files -> documents -> one cached token stream (np.memmap) -> training batches.

The default corpus (no `train.corpus` given) is the running interpreter's standard library
source, so every machine has the same kind of data offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from engram.config import Config, ConfigError
from engram.corpus import cache_key, corpus_files, files_fingerprint, iter_documents
from engram.fileio import atomic_open, atomic_write_text
from engram.tokenizer import CompressedVocab, build_tokenizer, compressed_vocab_for, eot_id, vocab_size_of

_ENCODE_CHUNK_BYTES = 1 << 20  # text per encode_batch call


# ---------------------------------------------------------------------------------------------
# token dataset


@dataclass
class TokenDataset:
    """train / val: 1-D token arrays (np.memmap, uint16 or uint32)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    path: Path | None = None

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def _checked(self, name: str, seq_len: int) -> np.ndarray:
        data = self.split(name)
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        if len(data) < seq_len + 1:
            raise ValueError(
                f"the {name} split has {len(data)} tokens, fewer than seq_len+1={seq_len + 1}; use a bigger "
                f"corpus (train.corpus / train.max_corpus_mb), a larger train.val_fraction or a smaller seq_len"
            )
        return data

    @staticmethod
    def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
        chunk = np.asarray(data[idx], dtype=np.int64)  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]  # x, y: (B, T), y[t] = x[t+1]

    def batch(
        self, split: str, *, batch_size: int, seq_len: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Random contiguous windows: x, y int64 (B, T) with y = x shifted left by one."""
        data = self._checked(split, seq_len)
        starts = rng.integers(0, len(data) - seq_len, size=batch_size)  # (B,)
        return self._windows(data, starts, seq_len)

    def iter_eval_batches(
        self, split: str, *, batch_size: int, seq_len: int, num_batches: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """A fixed set of num_batches (x, y) batches at evenly spaced offsets (same every call)."""
        data = self._checked(split, seq_len)
        total = batch_size * num_batches
        starts = np.linspace(0, len(data) - seq_len - 1, total).round().astype(np.int64)
        return [self._windows(data, starts[i * batch_size : (i + 1) * batch_size], seq_len) for i in range(num_batches)]


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size < 2**16 else np.uint32


def _write_tokens(tok: Tokenizer, files: list[Path], *, max_bytes: int, out: Path, dtype: type) -> int:
    sep: np.ndarray = np.array([eot_id(tok)], dtype=dtype)
    n = 0
    with atomic_open(out) as fh:

        def flush(docs: list[str]) -> int:
            parts = []
            for enc in tok.encode_batch(docs, add_special_tokens=False):
                parts += [np.asarray(enc.ids, dtype=dtype), sep]
            arr = np.concatenate(parts)
            arr.tofile(fh)
            return int(arr.size)

        pending: list[str] = []
        pending_bytes = 0
        for doc in iter_documents(files, max_bytes):
            pending.append(doc)
            pending_bytes += len(doc)
            if pending_bytes >= _ENCODE_CHUNK_BYTES:
                n += flush(pending)
                pending, pending_bytes = [], 0
        if pending:
            n += flush(pending)
    return n


def tokenize_to_memmap(
    tokenizer: Tokenizer, files: list[Path], *, max_bytes: int, cache_dir: str | Path, val_fraction: float
) -> TokenDataset:
    """Tokenise the corpus once (documents joined by <|endoftext|>) into a cached memmap; split off val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    vocab = vocab_size_of(tokenizer)
    dtype = token_dtype(vocab)
    key = cache_key("tokens-v1", tokenizer.to_str(), files_fingerprint(files), max_bytes)
    out = Path(cache_dir) / "tokens" / f"tokens-{key}.{np.dtype(dtype).name}.bin"
    meta_path = out.with_suffix(".json")
    if not (out.is_file() and meta_path.is_file()):
        out.parent.mkdir(parents=True, exist_ok=True)
        n = _write_tokens(tokenizer, files, max_bytes=max_bytes, out=out, dtype=dtype)
        meta = {"tokens": n, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "files": len(files)}
        atomic_write_text(meta_path, json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    n = int(meta["tokens"])
    if n == 0 or out.stat().st_size != n * np.dtype(dtype).itemsize:
        raise ValueError(f"token cache {out} is empty or truncated; delete it and retry")
    tokens = np.memmap(out, dtype=dtype, mode="r", shape=(n,))
    n_val = int(n * val_fraction)
    return TokenDataset(train=tokens[: n - n_val], val=tokens[n - n_val :], vocab_size=vocab, path=out)


def prepare_data(cfg: Config) -> tuple[Tokenizer, CompressedVocab, TokenDataset]:
    """Corpus -> tokenizer (trained or loaded, cached) -> compression map -> cached token dataset."""
    files = corpus_files(cfg.train.corpus)
    max_bytes = int(cfg.train.max_corpus_mb * 2**20)
    tok = build_tokenizer(cfg, files)
    vocab = vocab_size_of(tok)
    if cfg.engram.enabled and not 0 <= cfg.engram.pad_id < vocab:
        raise ConfigError(f"engram.pad_id: {cfg.engram.pad_id} is outside the tokenizer's vocabulary 0..{vocab - 1}")
    compressed = compressed_vocab_for(cfg, tok)
    data = tokenize_to_memmap(
        tok,
        files,
        max_bytes=max_bytes,
        cache_dir=cfg.tokenizer.cache_dir,
        val_fraction=cfg.train.val_fraction,
    )
    return tok, compressed, data
