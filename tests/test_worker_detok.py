"""Incremental detokenisation equals decoding the whole sequence; stop strings are never partly streamed."""

from __future__ import annotations

from tokenizers import Tokenizer

from engram.checkpoint import load_model
from tests.worker_proc import shared_tiny_checkpoint
from worker.detok import IncrementalDetokenizer, StopText


def test_incremental_detokenisation_equals_the_full_decode() -> None:
    _, _, tok_json = load_model(shared_tiny_checkpoint())
    tok = Tokenizer.from_str(tok_json)
    prompt = tok.encode("def f(x):").ids
    text = "\n    return x * 2  # é ü 日本 🙂 done"
    ids = tok.encode(text).ids
    d = IncrementalDetokenizer(tok, prompt)
    assert "".join(d.push(i) for i in ids) == tok.decode(ids)


def test_stop_text_holds_back_a_possible_stop_and_cuts_at_it() -> None:
    st = StopText(["\n\n", "END"])
    out = [st.push(x) for x in ["abc", "\n", "x", "E", "N", "\n", "\nlater"]]
    assert out == [("abc", False), ("", False), ("\nx", False), ("", False), ("", False), ("EN", False), ("", True)]
    assert st.text == "abc\nxEN"
    st2 = StopText(["zz"])
    assert st2.push("az") == ("a", False) and st2.flush() == "z"
