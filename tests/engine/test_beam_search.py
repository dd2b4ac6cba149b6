"""Beam search: the best beam equals transformers ``generate(num_beams=k)`` (fixed length and with
EOS, k = 2 and 4, several prompts, length penalties), hypotheses come best first, beams share
prefix blocks through the prefix cache, no block leaks, bad parameters are refused."""

from __future__ import annotations

import random

import pytest
import torch

from pageant.engine import LLM, BeamSearchParams, InvalidRequestError
from pageant.engine.bench.scripts import peak_blocks_in_use

EOS = 2


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 30))] for _ in range(n)]


def hf_beams(path: str, prompt: list[int], k: int, max_new: int, eos: list[int] | None, length_penalty: float = 1.0):
    """transformers' best beam (prompt + generated, cut after EOS) and its score."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, num_beams=k, num_return_sequences=1, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=0, length_penalty=length_penalty,
                             early_stopping=False, output_scores=True, return_dict_in_generate=True)
    tokens, generated = out.sequences[0].tolist(), out.sequences[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(generated) if t in (eos or [])]
    if ends:  # shorter than the longest returned beam: padded after its EOS
        tokens = tokens[: len(prompt) + ends[0] + 1]
    return tokens, float(out.sequences_scores[0])


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("llama")


@pytest.mark.parametrize("k", [2, 4])
def test_fixed_length_equals_transformers(model, k):
    llm = LLM(model=model, enable_prefix_caching=True, block_size=8)
    ps = prompts(4, k)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in ps], BeamSearchParams(beam_width=k, max_tokens=8, ignore_eos=True))
    for p, out in zip(ps, outs):
        tokens, score = hf_beams(model, p, k, 8, eos=None)
        best = out.sequences[0]
        assert best.tokens == tokens
        assert best.score == pytest.approx(score, abs=1e-4)
        assert len(out.sequences) == k and all(len(s.tokens) == len(p) + 8 for s in out.sequences)
        assert [s.score for s in out.sequences] == sorted((s.score for s in out.sequences), reverse=True)
        assert best.cum_logprob == pytest.approx(sum(best.logprobs), abs=1e-4)
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


@pytest.fixture(scope="module")
def eos_model(make_checkpoint, hf_greedy):
    """The same random weights with a second EOS id: a token greedy decoding emits often, so
    hypotheses finish at different lengths."""
    import collections

    base = make_checkpoint("llama")
    counts = collections.Counter(t for out in hf_greedy(base, prompts(8, 99), 12) for t in out[2:])
    token = next(t for t, _ in counts.most_common() if t != EOS)
    return make_checkpoint("llama", eos_token_id=[EOS, token]), [EOS, token]


@pytest.mark.parametrize("k,length_penalty", [(2, 1.0), (4, 1.0), (4, 0.5), (3, 2.0)])
def test_with_eos_equals_transformers(eos_model, k, length_penalty):
    path, eos = eos_model
    llm = LLM(model=path, enable_prefix_caching=True, block_size=8)
    ps = prompts(6, 10 + k)
    params = BeamSearchParams(beam_width=k, max_tokens=12, length_penalty=length_penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in ps], params)
    ended_early = 0
    for p, out in zip(ps, outs):
        tokens, score = hf_beams(path, p, k, 12, eos=eos, length_penalty=length_penalty)
        assert out.sequences[0].tokens == tokens
        assert out.sequences[0].score == pytest.approx(score, abs=1e-4)
        ended_early += any(s.finish_reason == "stop" for s in out.sequences)
    if length_penalty <= 1.0:  # (a strong length penalty favours the beams that run to max_tokens)
        assert ended_early > 0, "no hypothesis ended with EOS: the test would not exercise EOS handling"
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_beams_share_prefix_blocks(model):
    """Peak KV blocks held during a step: with prefix caching the beams of a prompt hold their
    common full blocks once."""
    p = prompts(1, 3)[0] + list(range(10, 60))  # a long prompt: many shared full blocks
    params = BeamSearchParams(beam_width=4, max_tokens=6, ignore_eos=True)
    peaks = {}
    for caching in (True, False):
        llm = LLM(model=model, enable_prefix_caching=caching, block_size=8)
        peaks[caching] = peak_blocks_in_use(llm, lambda: llm.beam_search({"prompt_token_ids": p}, params))
    independent = 4 * -(-(len(p) + 6) // 8)
    assert peaks[False] == independent
    assert peaks[True] < independent / 2


def test_text_and_bad_params(model):
    llm = LLM(model=model)
    out = llm.beam_search("The quick brown fox", BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True))[0]
    best = out.sequences[0]
    assert best.text == llm.tokenizer.decode(best.tokens[len(llm.tokenizer.encode("The quick brown fox")):])
    for bad in (dict(beam_width=0, max_tokens=4), dict(beam_width=11, max_tokens=4), dict(beam_width=True, max_tokens=4),
                dict(beam_width=2, max_tokens=0), dict(beam_width=2, max_tokens=4, temperature=0.7)):
        with pytest.raises(ValueError):
            BeamSearchParams(**bad)
    with pytest.raises(InvalidRequestError, match="context"):
        llm.beam_search({"prompt_token_ids": [1] * 500}, BeamSearchParams(beam_width=2, max_tokens=100))
