"""Incremental detokenization never emits broken UTF-8, even when a character spans tokens."""

from __future__ import annotations

import pytest

from pageant.engine.detokenizer import detokenize_incrementally, find_stop_string, held_back_chars
from pageant.engine.outputs import RequestMetrics
from pageant.engine.sampling_params import SamplingParams
from pageant.engine.sequence import Request
from pageant.engine.testing import build_tokenizer
from pageant.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok")))


TEXT = "Grüße 🙂 — 日本語で話す 🚀✓ café"


def test_multibyte_characters_split_across_tokens(tokenizer):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.hf_tokenizer.encode(TEXT, add_special_tokens=False)
    # the byte-level BPE has no merges for most of these characters: some span several tokens
    pieces = [tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces), "test needs a character split across tokens"
    req = Request("r", None, prompt, SamplingParams(), 0, RequestMetrics(0.0), frozenset({2}))
    seq = req.new_sequence(0, list(prompt), None)
    deltas = []
    for t in ids:
        seq.token_ids.append(t)
        deltas.append(detokenize_incrementally(tokenizer, seq, skip_special_tokens=True))
    assert "".join(deltas) == TEXT == seq.text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some steps had to wait for the rest of a character


def test_special_tokens_skipped_or_kept(tokenizer):
    prompt = tokenizer.encode("x")
    ids = tokenizer.hf_tokenizer.encode("ab", add_special_tokens=False) + [2]
    for skip, expected in [(True, "ab"), (False, "ab</s>")]:
        req = Request("r", None, prompt, SamplingParams(), 0, RequestMetrics(0.0), frozenset({2}))
        seq = req.new_sequence(0, list(prompt), None)
        for t in ids:
            seq.token_ids.append(t)
            detokenize_incrementally(tokenizer, seq, skip_special_tokens=skip)
        assert seq.text == expected


def test_stop_string_helpers():
    assert find_stop_string("hello wor", 3, ("wor", "lo w")) == ("lo w", 3)  # earliest wins
    assert find_stop_string("hello wor", 1, ("llo",)) is None  # ended before the new text
    assert find_stop_string("abcSTOPx", 2, ("STOP",)) == ("STOP", 3)
    assert held_back_chars("hello ST", ("STOP",)) == 2
    assert held_back_chars("hello", ("STOP", "lo!")) == 2
    assert held_back_chars("hello", ("xyz",)) == 0
