"""Byte-level BPE tokenizer and the Engram vocabulary compression P: V -> V'.

`CompressedVocab` is the public demo's `CompressedTokenizer` lookup, built the same way:
each token id's decoded text is normalised (NFKC -> NFD -> strip accents -> lowercase ->
whitespace runs to one space, a whitespace-only token stays " " -> strip); tokens whose
decoding holds U+FFFD keep their raw token string as key, an empty normalisation keeps the
raw text, and canonical ids are handed out in first-seen order of token id.

The demo decodes through `transformers` (`tokenizer.decode([tid], skip_special_tokens=False)`),
which applies `clean_up_tokenization` when the tokenizer's `clean_up_tokenization_spaces` is
true (from tokenizer_config.json; transformers' default is False when absent). We do the same
with `tokenizers` alone: `clean_up_tokenization` below is transformers' rule list, verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from engram.config import Config, ConfigError
from engram.corpus import cache_key, files_fingerprint, iter_documents
from engram.fileio import atomic_write_text

SPECIAL_TOKENS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]  # ids 0, 1, 2 in a trained tokenizer
EOT_ID, BOS_ID, PAD_ID = 0, 1, 2
_EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")

SENTINEL = "\ue000"  # protects a whitespace-only token from Strip()
_NORMALIZER = normalizers.Sequence(
    [
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(SENTINEL, " "),
    ]
)


def normalize(text: str) -> str:
    """The demo's canonicalisation of one token's text."""
    return str(_NORMALIZER.normalize_str(text))


# ---------------------------------------------------------------------------------------------
# building a tokenizer


def train_bpe(files: list[Path], *, vocab_size: int, cache_dir: str | Path, max_bytes: int) -> Tokenizer:
    """Byte-level BPE on the first `max_bytes` of the corpus; cached as tokenizer.json under cache_dir."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ConfigError(f"tokenizer.vocab_size: {vocab_size} is below the 256 bytes + special tokens")
    key = cache_key("bpe-v1", files_fingerprint(files), vocab_size, max_bytes)
    path = Path(cache_dir) / "tokenizers" / f"bpe-{key}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(files, max_bytes), trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} did not get id {i}"
    atomic_write_text(path, tok.to_str())
    return tok


def clean_up_tokenization(text: str) -> str:
    """transformers' `PreTrainedTokenizerBase.clean_up_tokenization`: the same replacements, in order."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def tokenizer_json_path(path: str | Path) -> Path:
    """tokenizer.path may name the tokenizer.json or the folder holding it (a Hugging Face model dir)."""
    p = Path(path)
    return p / "tokenizer.json" if p.is_dir() else p


def read_clean_up_flag(path: str | Path) -> bool:
    """`clean_up_tokenization_spaces` from the tokenizer_config.json beside the tokenizer; False when absent."""
    cfg_path = tokenizer_json_path(path).with_name("tokenizer_config.json")
    if not cfg_path.is_file():
        return False
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tokenizer.path: {cfg_path} is not valid JSON ({exc})") from None
    value = data.get("clean_up_tokenization_spaces", False) if isinstance(data, dict) else None
    if not isinstance(value, bool):
        raise ConfigError(
            f"tokenizer.path: {cfg_path}: clean_up_tokenization_spaces must be true or false, got {value!r}"
        )
    return value


def clean_up_flag(cfg: Config) -> bool:
    """The config's explicit setting, else the loaded tokenizer's tokenizer_config.json, else False."""
    tc = cfg.tokenizer
    if tc.clean_up_tokenization_spaces is not None:
        return bool(tc.clean_up_tokenization_spaces)
    return read_clean_up_flag(tc.path) if tc.path else False


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = tokenizer_json_path(path)
    if not p.is_file():
        raise ConfigError(
            f"tokenizer.path: {path} does not exist" + (" (no tokenizer.json in it)" if p != Path(path) else "")
        )
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ConfigError(f"tokenizer.path: {path} is not a valid tokenizer.json ({exc})") from None


def vocab_size_of(tok: Tokenizer) -> int:
    return int(tok.get_vocab_size(with_added_tokens=True))


def eot_id(tok: Tokenizer) -> int:
    """The document separator: <|endoftext|> (id 0 in our BPE) or a loaded tokenizer's end token."""
    for name in _EOT_CANDIDATES:
        tid = tok.token_to_id(name)
        if tid is not None:
            return int(tid)
    raise ConfigError(f"tokenizer.path: the tokenizer has none of the end-of-text tokens {_EOT_CANDIDATES}")


def build_tokenizer(cfg: Config, files: list[Path]) -> Tokenizer:
    """cfg.tokenizer.path -> load it; else train a BPE of cfg.tokenizer.vocab_size on `files`."""
    tc = cfg.tokenizer
    if tc.path:
        tok, source = load_tokenizer(tc.path), f"tokenizer.path={tc.path}"
    else:
        max_bytes = int(cfg.train.max_corpus_mb * 2**20)
        tok = train_bpe(files, vocab_size=tc.vocab_size, cache_dir=tc.cache_dir, max_bytes=max_bytes)
        source = f"tokenizer.vocab_size={tc.vocab_size}"
    n = vocab_size_of(tok)
    if n > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer: {source} has {n} tokens, more than model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size >= {n}"
        )
    return tok


# ---------------------------------------------------------------------------------------------
# vocabulary compression


def compression_lookup(tok: Tokenizer, *, clean_up_tokenization_spaces: bool = False) -> np.ndarray:
    """lookup[token id] = canonical id, exactly as the demo's `_build_lookup_table`. (V,) int64."""
    vocab = vocab_size_of(tok)
    key_to_new: dict[str, int] = {}
    lookup = np.empty(vocab, dtype=np.int64)
    for tid in range(vocab):
        text = tok.decode([tid], skip_special_tokens=False)
        if clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        if "\ufffd" in text:
            key = str(tok.id_to_token(tid))
        else:
            key = normalize(text) or text
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup


class CompressedVocab:
    """The surjective map P from raw token ids to canonical ids (the demo's CompressedTokenizer).

    `lookup` is (V,) int64; `size` = |V'|; `ratio` = 1 - |V'|/|V| (the fraction of ids saved).
    Calling it maps ids >= 0 through the lookup and leaves negative ids unchanged; numpy in ->
    numpy int64 out, torch in -> torch int64 on the same device.
    """

    def __init__(self, lookup: Sequence[int] | np.ndarray):
        arr = np.asarray(lookup, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"CompressedVocab: lookup must be a non-empty 1-D array, got shape {arr.shape}")
        size = int(arr.max()) + 1
        if arr.min() < 0 or np.unique(arr).size != size:
            raise ValueError("CompressedVocab: lookup must map onto every canonical id 0..size-1")
        self.lookup = arr
        self.size = size
        self.vocab_size = int(arr.size)
        self._torch: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, *, clean_up_tokenization_spaces: bool = False) -> CompressedVocab:
        return cls(compression_lookup(tok, clean_up_tokenization_spaces=clean_up_tokenization_spaces))

    @classmethod
    def identity(cls, vocab_size: int) -> CompressedVocab:
        """No compression (the `engram.compress_vocab=false` ablation): |V'| = |V|."""
        return cls(np.arange(vocab_size, dtype=np.int64))

    @property
    def ratio(self) -> float:
        return 1.0 - self.size / self.vocab_size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"CompressedVocab(vocab_size={self.vocab_size}, size={self.size}, ratio={self.ratio:.3f})"

    def to_dict(self) -> dict[str, Any]:
        """Plain ints only, so it fits JSON and torch.load(weights_only=True)."""
        return {"vocab_size": self.vocab_size, "size": self.size, "lookup": self.lookup.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressedVocab:
        cv = cls(data["lookup"])
        if cv.size != data.get("size", cv.size) or cv.vocab_size != data.get("vocab_size", cv.vocab_size):
            raise ValueError("CompressedVocab.from_dict: size/vocab_size disagree with the lookup")
        return cv

    def torch_lookup(self, device: torch.device | str) -> torch.Tensor:
        """(V,) int64 copy of the lookup on `device`, cached per device."""
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        table = self._torch.get(dev)
        if table is None:
            table = torch.from_numpy(self.lookup.copy()).to(dev)
            self._torch[dev] = table
        return table

    def _check_range(self, max_id: int) -> None:
        if max_id >= self.vocab_size:
            raise ValueError(f"CompressedVocab: token id {max_id} is outside the vocabulary 0..{self.vocab_size - 1}")

    @overload
    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...
    @overload
    def __call__(self, ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray: ...

    def __call__(self, ids: Any) -> Any:
        if isinstance(ids, torch.Tensor):
            ids = ids.long()
            if ids.device.type == "cpu" and ids.numel():
                self._check_range(int(ids.max()))  # on GPU an out-of-range id is a device assert
            table = self.torch_lookup(ids.device)
            return torch.where(ids >= 0, table[ids.clamp_min(0)], ids)
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size:
            self._check_range(int(arr.max()))
        return np.where(arr >= 0, self.lookup[np.maximum(arr, 0)], arr)


def compressed_vocab_for(cfg: Config, tok: Tokenizer) -> CompressedVocab:
    """The compression the config asks for; refuses a layout built for a different |V'|.

    Every hash multiplier depends on |V'|, so a layout (engram.compressed_vocab_size > 0) is only
    valid with exactly the compressed vocabulary it was built for.
    """
    e = cfg.engram
    if e.compress_vocab:
        cv = CompressedVocab.from_tokenizer(tok, clean_up_tokenization_spaces=clean_up_flag(cfg))
    else:
        cv = CompressedVocab.identity(vocab_size_of(tok))
    if e.compressed_vocab_size and cv.size != e.compressed_vocab_size:
        raise ConfigError(
            f"engram.compressed_vocab_size: the layout was built for |V'| = {e.compressed_vocab_size:,} but this "
            f"tokenizer compresses {cv.vocab_size:,} tokens to |V'| = {cv.size:,} (compress_vocab="
            f"{e.compress_vocab}, clean_up_tokenization_spaces={clean_up_flag(cfg)}); every hash multiplier "
            "depends on |V'|, so use the layout's tokenizer and settings"
        )
    return cv
