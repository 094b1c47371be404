"""Hugging Face tokenizer folders: transformers' decode clean-up, |V'| reported and checked against a layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engram.config import ConfigError, load_config
from engram.tokenizer import (
    CompressedVocab,
    clean_up_flag,
    clean_up_tokenization,
    compressed_vocab_for,
    load_tokenizer,
    read_clean_up_flag,
)

# byte-level tokens ("Ġ" is the byte-level space): two of them decode to text that transformers'
# clean-up rewrites into the text of another token ("a ." -> "a.", "it 's" -> "it's")
TOKENS = [
    "<s>",
    "</s>",
    "<pad>",
    "a",
    "Ġ",
    ".",
    "'",
    "s",
    "aĠ.",
    "a.",
    "it",
    "itĠ's",
    "it's",
    "Ġ.",
    "Ġ,",
    "doĠn't",
    "don't",
    "Ġ?",
    "xĠ!y",
]


def write_hf_tokenizer(folder: Path, clean_up: bool | None) -> Path:
    """A tokenizer.json (byte-level BPE, no merges needed) + tokenizer_config.json, as transformers saves them."""
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(TOKENS)}, merges=[], unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if clean_up is not None:
        cfg["clean_up_tokenization_spaces"] = clean_up
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_clean_up_rules_are_transformers() -> None:
    cases = {
        "a .": "a.",
        "a ?": "a?",
        "b !": "b!",
        "c ,": "c,",
        "x ' y": "x'y",
        "do n't": "don't",
        "I 'm": "I'm",
        "it 's": "it's",
        "we 've": "we've",
        "they 're": "they're",
        # near misses the rule list does not touch
        "a ;": "a ;",
        "a :": "a :",
        "we 'll": "we 'll",
        "a  .": "a .",
        ". .": "..",
    }
    for text, want in cases.items():
        assert clean_up_tokenization(text) == want, text


def test_decode_with_clean_up_merges_keys(tmp_path: Path) -> None:
    folder = write_hf_tokenizer(tmp_path / "hf", clean_up=True)
    tok = load_tokenizer(folder)  # a folder works as well as the tokenizer.json inside it
    assert tok.decode([TOKENS.index("aĠ.")]) == "a ."
    plain = CompressedVocab.from_tokenizer(tok)
    cleaned = CompressedVocab.from_tokenizer(tok, clean_up_tokenization_spaces=True)
    lookup = {t: cleaned.lookup[i] for i, t in enumerate(TOKENS)}
    assert lookup["aĠ."] == lookup["a."] and lookup["itĠ's"] == lookup["it's"] and lookup["doĠn't"] == lookup["don't"]
    assert plain.lookup[TOKENS.index("aĠ.")] != plain.lookup[TOKENS.index("a.")]
    # " ." / " ," / " ?" strip to the same key either way; "x !y" -> "x!y" changes only its own key
    assert lookup["Ġ."] == lookup["."]
    assert plain.size - cleaned.size == 3
    # canonical ids stay in first-seen order of token id
    first = {}
    expected = [first.setdefault(c, len(first)) for c in cleaned.lookup]
    np.testing.assert_array_equal(cleaned.lookup, expected)


@pytest.mark.parametrize(
    ("in_file", "override", "want"),
    [
        (True, None, True),
        (False, None, False),
        (None, None, False),
        (True, "false", False),
        (False, "true", True),
    ],
)
def test_flag_comes_from_tokenizer_config(
    tmp_path: Path, in_file: bool | None, override: str | None, *, want: bool
) -> None:
    folder = write_hf_tokenizer(tmp_path / "hf", clean_up=in_file)
    assert read_clean_up_flag(folder / "tokenizer.json") is (bool(in_file) if in_file is not None else False)
    sets = [f"tokenizer.path={folder}", "model.vocab_size=512", "tokenizer.vocab_size=512"]
    if override is not None:
        sets.append(f"tokenizer.clean_up_tokenization_spaces={override}")
    cfg = load_config("tiny", overrides=sets)
    assert clean_up_flag(cfg) is want


def test_layout_with_other_compressed_size_is_refused(tmp_path: Path) -> None:
    folder = write_hf_tokenizer(tmp_path / "hf", clean_up=True)
    tok = load_tokenizer(folder)
    base = [f"tokenizer.path={folder}", "model.vocab_size=512", "tokenizer.vocab_size=512"]
    size = CompressedVocab.from_tokenizer(tok, clean_up_tokenization_spaces=True).size
    cfg = load_config("tiny", overrides=[*base, f"engram.compressed_vocab_size={size}"])
    assert compressed_vocab_for(cfg, tok).size == size
    # the same layout with the clean-up switched off: |V'| moves by 3 and the layout is refused
    cfg = load_config(
        "tiny",
        overrides=[*base, f"engram.compressed_vocab_size={size}", "tokenizer.clean_up_tokenization_spaces=false"],
    )
    with pytest.raises(
        ConfigError,
        match=f"built for \\|V'\\| = {size} but this tokenizer compresses "
        f"{len(TOKENS)} tokens to \\|V'\\| = {size + 3}",
    ):
        compressed_vocab_for(cfg, tok)
    # the no-compression ablation hashes raw ids
    cfg = load_config("tiny", overrides=[*base, "engram.compress_vocab=false"])
    cv = compressed_vocab_for(cfg, tok)
    assert cv.size == len(TOKENS) and cv.lookup.tolist() == list(range(len(TOKENS)))


def test_bad_tokenizer_config(tmp_path: Path) -> None:
    folder = write_hf_tokenizer(tmp_path / "hf", clean_up=None)
    (folder / "tokenizer_config.json").write_text('{"clean_up_tokenization_spaces": "yes"}')
    with pytest.raises(ConfigError, match="clean_up_tokenization_spaces must be true or false, got 'yes'"):
        read_clean_up_flag(folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_clean_up_flag(folder)
    with pytest.raises(ConfigError, match="no tokenizer.json in it"):
        load_tokenizer(tmp_path)
