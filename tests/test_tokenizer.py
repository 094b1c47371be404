"""Tokenizer training/caching/loading and the demo-exact vocabulary compression."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

import engram.tokenizer as tokmod
from engram.config import ConfigError, tiny
from engram.tokenizer import (
    SPECIAL_TOKENS,
    CompressedVocab,
    build_tokenizer,
    eot_id,
    load_tokenizer,
    normalize,
    train_bpe,
)

# token -> expected canonical id, in token-id order (first-seen order decides the canonical ids)
HAND_VOCAB = [
    ("<|endoftext|>", 0),
    ("<|bos|>", 1),
    ("<|pad|>", 2),
    ("Hello", 3),
    ("hello", 3),
    (" hello", 3),
    ("HELLO", 3),
    ("h\u00e9llo", 3),  # accent stripped
    (" ", 4),
    ("\n", 4),  # whitespace-only tokens all become " "
    ("  \t", 4),
    ("World", 5),
    ("a\ufffd", 6),  # U+FFFD: the raw token is the key, so these two stay apart
    ("A\ufffd", 7),
    ("\u0301", 8),  # normalises to "" -> keeps its raw text
    ("\u0300", 9),
    ("\ufb01", 10),  # the "fi" ligature; NFKC -> "fi"
    ("fi", 10),
    (" World \n", 5),
]


def hand_tokenizer(vocab: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<|pad|>"))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_corpus(folder: Path, n_words: int = 6000, seed: int = 0) -> Path:
    """Pseudo-English from a syllable set: enough distinct merges for a few hundred BPE tokens."""
    rng = np.random.default_rng(seed)
    syllables = "ka lo mi ne ru sa to vi pe dor lin gra sto Hel hel".split()
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(n_words)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        chunk = words[i::3]
        lines = [" ".join(chunk[j : j + 12]) for j in range(0, len(chunk), 12)]
        (folder / f"part{i}.txt").write_text("Hello hello HELLO world.\n" + "\n".join(lines) + "\n")
    return folder


def test_normalize_matches_demo_rules() -> None:
    assert normalize(" Hello\t") == "hello"
    assert normalize("  \n\t") == " "
    assert normalize("h\u00e9LLo  wORld") == "hello world"
    assert normalize("\u0301") == ""


def test_compression_on_hand_built_vocab() -> None:
    tok = hand_tokenizer([t for t, _ in HAND_VOCAB])
    cv = CompressedVocab.from_tokenizer(tok)
    expected = np.array([c for _, c in HAND_VOCAB], dtype=np.int64)
    np.testing.assert_array_equal(cv.lookup, expected)
    assert cv.lookup.dtype == np.int64 and cv.lookup.shape == (len(HAND_VOCAB),)
    assert cv.vocab_size == len(HAND_VOCAB) and cv.size == 11 and len(cv) == 11
    assert cv.ratio == pytest.approx(1 - 11 / len(HAND_VOCAB))


def test_compression_numpy_torch_and_negative_ids() -> None:
    cv = CompressedVocab.from_tokenizer(hand_tokenizer([t for t, _ in HAND_VOCAB]))
    ids = np.array([[3, 4, 5, -1, 8], [-7, 17, 16, 0, 18]])  # (B=2, T=5)
    expected = np.array([[3, 3, 3, -1, 4], [-7, 10, 10, 0, 5]])
    out = cv(ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(cv([3, 4, -1]), [3, 3, -1])
    t = cv(torch.from_numpy(ids).to(torch.int32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), expected)
    assert cv.torch_lookup("cpu") is cv.torch_lookup(torch.device("cpu"))  # cached per device
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cv(np.array([len(HAND_VOCAB)]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_compression_cuda_keeps_device() -> None:
    cv = CompressedVocab.from_tokenizer(hand_tokenizer([t for t, _ in HAND_VOCAB]))
    ids = torch.tensor([[3, -2, 9, 18]], device="cuda")
    out = cv(ids)
    assert out.device.type == "cuda"
    np.testing.assert_array_equal(out.cpu().numpy(), [[3, -2, 4, 5]])


def test_compressed_vocab_round_trip_and_validation() -> None:
    cv = CompressedVocab.from_tokenizer(hand_tokenizer([t for t, _ in HAND_VOCAB]))
    data = json.loads(json.dumps(cv.to_dict()))
    again = CompressedVocab.from_dict(data)
    np.testing.assert_array_equal(again.lookup, cv.lookup)
    assert again.size == cv.size
    with pytest.raises(ValueError, match="canonical id"):
        CompressedVocab([0, 2])  # id 1 is never hit: not surjective
    with pytest.raises(ValueError):
        CompressedVocab.from_dict({"lookup": [0, 1], "size": 3})


def demo_lookup(tok: Tokenizer) -> list[int]:
    """The demo's _build_lookup_table, transcribed, as an independent reference."""
    key2new: dict[str, int] = {}
    out = []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        key = tok.id_to_token(tid) if "\ufffd" in text else (normalize(text) or text)
        out.append(key2new.setdefault(key, len(key2new)))
    return out


def test_trained_bpe_special_ids_and_merges(tmp_path: Path) -> None:
    files = sorted(write_corpus(tmp_path / "corpus").glob("*.txt"))
    tok = train_bpe(files, vocab_size=400, cache_dir=tmp_path / "cache", max_bytes=1 << 20)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2] and eot_id(tok) == 0
    assert 259 < tok.get_vocab_size() <= 400
    text = "Hello hello world\n  x"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level round trip
    cv = CompressedVocab.from_tokenizer(tok)
    assert cv.lookup.tolist() == demo_lookup(tok)
    assert 0 < cv.ratio < 1
    # "Hel"/"hel"/"Ġhel"/"ĠHel" are all in the vocab and must share one canonical id
    hel = [tok.token_to_id(t) for t in ("Hel", "hel", "\u0120hel", "\u0120Hel")]
    assert None not in hel and len({int(cv.lookup[i]) for i in hel}) == 1
    # byte tokens that are whitespace: space (Ġ), newline (Ċ), tab (ĉ) -> canonical " "
    ws = {int(cv.lookup[tok.token_to_id(t)]) for t in ("\u0120", "\u010a", "\u0109")}
    assert len(ws) == 1
    # a lone UTF-8 continuation byte decodes to U+FFFD and keeps its own raw key
    assert len({int(cv.lookup[tok.token_to_id(t)]) for t in ("\u00c2", "\u00c3")}) == 2


def test_train_bpe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(write_corpus(tmp_path / "corpus").glob("*.txt"))
    cache = tmp_path / "cache"
    first = train_bpe(files, vocab_size=400, cache_dir=cache, max_bytes=1 << 20)
    cached = list((cache / "tokenizers").glob("bpe-*.json"))
    assert len(cached) == 1

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tokmod.trainers, "BpeTrainer", no_training)
    second = train_bpe(files, vocab_size=400, cache_dir=cache, max_bytes=1 << 20)
    assert second.get_vocab() == first.get_vocab()
    monkeypatch.undo()
    train_bpe(files, vocab_size=300, cache_dir=cache, max_bytes=1 << 20)  # another key, another file
    assert len(list((cache / "tokenizers").glob("bpe-*.json"))) == 2


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_tokenizer(bad)


def test_build_tokenizer_loads_and_checks_model_vocab(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    hand_tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(600)]).save(str(path))
    cfg = tiny()
    cfg.tokenizer.path = str(path)
    with pytest.raises(ConfigError) as err:
        build_tokenizer(cfg, [])
    msg = str(err.value)
    assert "tokenizer" in msg and "model.vocab_size" in msg and "603" in msg and "512" in msg
    cfg.model.vocab_size = 603
    assert build_tokenizer(cfg, []).get_vocab_size() == 603


def test_build_tokenizer_trains_when_no_path(tmp_path: Path) -> None:
    files = sorted(write_corpus(tmp_path / "corpus").glob("*.txt"))
    cfg = tiny()
    cfg.tokenizer.cache_dir = str(tmp_path / "cache")
    tok = build_tokenizer(cfg, files)
    assert tok.get_vocab_size() <= cfg.model.vocab_size
    cfg.model.vocab_size = 300  # the trained 512-token BPE no longer fits
    with pytest.raises(ConfigError, match="model.vocab_size=300"):
        build_tokenizer(cfg, files)
