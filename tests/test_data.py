"""Corpus discovery, document reading, the cached token memmap and batching."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import engram.data as datamod
from engram.config import ConfigError, tiny
from engram.corpus import corpus_files, iter_documents
from engram.data import TokenDataset, prepare_data, tokenize_to_memmap
from engram.tokenizer import EOT_ID, train_bpe


def write_corpus(folder: Path, n_words: int = 6000, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    syllables = "ka lo mi ne ru sa to vi pe dor lin gra sto".split()
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(n_words)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(3):
        chunk = words[i::3]
        path = folder / f"part{i}.txt"
        path.write_text("\n".join(" ".join(chunk[j : j + 12]) for j in range(0, len(chunk), 12)) + "\n")
        paths.append(path)
    return paths


def test_default_corpus_is_stdlib() -> None:
    files = corpus_files([])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert files == corpus_files([])  # a stable order, mixed across packages (not alphabetical)
    first_tenth = {f.relative_to(stdlib).parts[0] for f in files[: len(files) // 10]}
    assert len(first_tenth) > 20
    assert all(f.suffix == ".py" and f.is_relative_to(stdlib) for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert stdlib / "os.py" in files


def test_corpus_files_folders_and_errors(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.md", "a/b/y.jsonl", "a/z.bin", "a/b/w.py", "single.dat"):
        (tmp_path / name).write_text("text")
    files = corpus_files([str(tmp_path / "a"), str(tmp_path / "single.dat"), str(tmp_path / "a" / "x.md")])
    assert files == [
        tmp_path / "a/b/w.py",
        tmp_path / "a/b/y.jsonl",
        tmp_path / "a/x.md",
        tmp_path / "single.dat",
    ]
    with pytest.raises(ConfigError, match=r"train\.corpus: .*nope does not exist"):
        corpus_files([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"train\.corpus"):
        corpus_files([str(tmp_path / "empty")])


def test_iter_documents_jsonl_and_cap(tmp_path: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"text": "first doc"}) + "\n\n" + json.dumps({"text": "caf\u00e9", "id": 2}) + "\n")
    txt = tmp_path / "e.txt"
    txt.write_bytes(b"plain \xff bytes")
    assert list(iter_documents([jl, txt], 1000)) == ["first doc", "caf\u00e9", "plain \ufffd bytes"]
    assert list(iter_documents([jl, txt], 12)) == ["first doc", "caf"]  # 9 + 3 bytes; no half "é"
    assert list(iter_documents([jl, txt], 9)) == ["first doc"]


@pytest.mark.parametrize("line", ["{broken", json.dumps({"txt": "x"}), json.dumps(["text"]), json.dumps({"text": 3})])
def test_iter_documents_bad_jsonl_line(tmp_path: Path, line: str) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(iter_documents([jl], 1000))


def test_batches_shapes_shift_and_eval_windows() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    ds = TokenDataset(train=tokens[:900], val=tokens[900:], vocab_size=1000)
    rng = np.random.default_rng(0)
    x, y = ds.batch("train", batch_size=4, seq_len=16, rng=rng)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(y - x, np.ones_like(x))  # contiguous windows of arange
    assert x.min() >= 0 and y.max() < 900
    again = ds.batch("train", batch_size=4, seq_len=16, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again[0], x)

    evals = ds.iter_eval_batches("val", batch_size=2, seq_len=10, num_batches=3)
    assert len(evals) == 3
    starts = [int(b[0][i, 0]) for b in evals for i in range(2)]
    assert starts[0] == 900 and int(evals[-1][1][-1, -1]) == 999  # first and last token of the split
    assert starts == sorted(starts)
    same = ds.iter_eval_batches("val", batch_size=2, seq_len=10, num_batches=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(evals, same, strict=True))

    with pytest.raises(ValueError, match="val split has 100 tokens"):
        ds.batch("val", batch_size=1, seq_len=100, rng=rng)
    with pytest.raises(ValueError, match="split"):
        ds.batch("test", batch_size=1, seq_len=4, rng=rng)


def test_tokenize_to_memmap_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    tok = train_bpe(files, vocab_size=400, cache_dir=cache, max_bytes=1 << 20)
    ds = tokenize_to_memmap(tok, files, max_bytes=1 << 20, cache_dir=cache, val_fraction=0.1)
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    n = len(ds.train) + len(ds.val)
    assert len(ds.val) == int(n * 0.1)
    stream = np.concatenate([ds.train, ds.val])
    assert int((stream == EOT_ID).sum()) == 3  # one separator after each of the 3 documents
    first_doc = stream[: int(np.argmax(stream == EOT_ID))].tolist()
    assert tok.decode(first_doc) == files[0].read_text()
    assert len(list((cache / "tokens").glob("*.bin"))) == 1

    def no_encoding(*args: object, **kwargs: object) -> int:
        raise AssertionError("tokenised again instead of reusing the memmap")

    monkeypatch.setattr(datamod, "_write_tokens", no_encoding)
    again = tokenize_to_memmap(tok, files, max_bytes=1 << 20, cache_dir=cache, val_fraction=0.2)
    assert len(again.train) + len(again.val) == n and len(again.val) == int(n * 0.2)
    monkeypatch.undo()
    capped = tokenize_to_memmap(tok, files, max_bytes=2000, cache_dir=cache, val_fraction=0.1)
    assert len(capped.train) + len(capped.val) < n  # a new key for a new cap
    assert len(list((cache / "tokens").glob("*.bin"))) == 2


def test_prepare_data_tiny(tmp_path: Path) -> None:
    cfg = tiny()
    cfg.train.corpus = [str(tmp_path / "corpus")]
    cfg.tokenizer.cache_dir = str(tmp_path / "cache")
    write_corpus(tmp_path / "corpus")
    tok, compressed, data = prepare_data(cfg)
    assert tok.get_vocab_size() <= cfg.model.vocab_size
    assert compressed.vocab_size == tok.get_vocab_size() and 0 < compressed.size < compressed.vocab_size
    assert data.vocab_size == tok.get_vocab_size()
    x, y = data.batch("val", batch_size=cfg.train.batch_size, seq_len=cfg.train.seq_len, rng=np.random.default_rng(1))
    assert x.shape == (cfg.train.batch_size, cfg.train.seq_len) and int(x.max()) < tok.get_vocab_size()
    assert compressed(x).max() < compressed.size

    cfg.train.corpus = [str(tmp_path / "missing")]
    with pytest.raises(ConfigError, match="train.corpus"):
        prepare_data(cfg)
