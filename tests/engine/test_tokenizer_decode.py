"""``Tokenizer.decode`` calls the Rust decoder directly only where that is exactly what
transformers' ``decode`` returns; everywhere else it goes through transformers."""

from __future__ import annotations

import random

import pytest

from pageant.engine.testing import build_tokenizer
from pageant.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_fast_path_equals_transformers(tok_path):
    tok = Tokenizer(tok_path)
    assert tok._backend is not None  # the test tokenizer is fast and does no clean-up
    rng = random.Random(0)
    cases = [[], [1], [1, 2, 0], [2, 2]] + [[rng.randrange(len(tok.hf_tokenizer)) for _ in range(rng.randrange(1, 9))]
                                           for _ in range(500)]
    cases.append(tok.encode("héllo wörld — naïve café 日本語 🙂🚀 (a, b).")[2:])  # cut inside multi-byte characters
    for ids in cases:
        for skip in (True, False):
            assert tok.decode(ids, skip) == tok.hf_tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_clean_up_or_non_list_goes_through_transformers(tok_path):
    tok = Tokenizer(tok_path)
    ids = tok.encode("a , b .")
    assert tok.decode(tuple(ids)) == tok.hf_tokenizer.decode(list(ids), skip_special_tokens=True)
    tok.hf_tokenizer.clean_up_tokenization_spaces = True
    from pageant.engine.tokenizer import _exact_backend

    assert _exact_backend(tok.hf_tokenizer) is None  # clean-up would change the Rust decoder's text
