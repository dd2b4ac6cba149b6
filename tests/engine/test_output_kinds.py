"""``SamplingParams.output_kind`` (vLLM's ``RequestOutputKind``) and the batched detokenizer.

DELTA outputs concatenate to exactly the CUMULATIVE final output (text with stop-string hold-back,
token ids, logprobs), across batching, preemption, chunked prefill and ``n > 1``; FINAL_ONLY gives
one output, the same final one; ``LLM.generate`` asks for FINAL_ONLY without touching the caller's
parameters. ``detokenize_batch`` equals ``detokenize_incrementally`` sequence by sequence.
"""

from __future__ import annotations

import random

import pytest

from pageant.engine import LLM, InvalidRequestError, RequestOutputKind, SamplingParams
from pageant.engine.detokenizer import detokenize_batch, detokenize_incrementally
from pageant.engine.outputs import RequestMetrics
from pageant.engine.sequence import Request
from pageant.engine.testing import build_tokenizer
from pageant.engine.tokenizer import Tokenizer

CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    # a small pool and token budget: requests preempt each other and prompts are chunked
    return LLM(model=tiny_checkpoint, max_num_seqs=8, num_kv_blocks=14, block_size=8, max_model_len=256,
               max_num_batched_tokens=32)


PROMPTS = ["Hello there, how are you today my friend", "abc", "The function returns " * 4, "Once upon a time"]


def _params(kind, **kw):
    base = dict(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2, output_kind=kind)
    base.update(kw)
    return SamplingParams(**base)


def _run(engine, kind, prompts=PROMPTS, **kw):
    seen: dict[str, list] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{kind.name}-{i}", prompt, _params(kind, **kw), cache_salt=None)
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [seen[f"{kind.name}-{i}"] for i in range(len(prompts))]


def _joined(outs, n):
    """The DELTA outputs of one request joined per sample index."""
    text, ids, lps, reasons = ([""] * n, [[] for _ in range(n)], [[] for _ in range(n)], [None] * n)
    for out in outs:
        for c in out.outputs:
            assert reasons[c.index] is None, "nothing may follow a sample's finish reason"
            text[c.index] += c.text
            ids[c.index] += c.token_ids
            lps[c.index] += c.logprobs
            reasons[c.index] = c.finish_reason
    return text, ids, lps, reasons


@pytest.mark.parametrize("extra", [{}, {"stop": ["e t", "ion r"]}, {"n": 2, "temperature": 1.0, "seed": 5}])
def test_delta_outputs_concatenate_to_the_cumulative_result(llm, extra):
    engine = llm.engine
    before = engine.scheduler.num_preemptions
    cumulative = _run(engine, CUMULATIVE, **extra)
    delta = _run(engine, DELTA, **extra)
    assert engine.scheduler.num_preemptions > before  # the pool is small enough to preempt
    n = extra.get("n", 1)
    for cum, dl in zip(cumulative, delta):
        final = cum[-1]
        text, ids, lps, reasons = _joined(dl, n)
        assert text == [c.text for c in final.outputs]
        assert ids == [c.token_ids for c in final.outputs]
        assert lps == [c.logprobs for c in final.outputs]
        assert reasons == [c.finish_reason for c in final.outputs]
        assert [o.finished for o in dl] == [False] * (len(dl) - 1) + [True]
        assert len(dl) == len(cum)  # one output per step that changed the request, as CUMULATIVE
        for out in dl:
            assert out.outputs, "a DELTA output carries at least one sample"
            assert all(c.token_ids or c.text or c.finish_reason for c in out.outputs)
            for c in out.outputs:  # the cumulative logprob is still the whole sample's so far
                assert c.cumulative_logprob is not None


def test_delta_sends_prompt_logprobs_once(llm):
    cum = _run(llm.engine, CUMULATIVE, prompts=PROMPTS[:2], prompt_logprobs=1)
    dl = _run(llm.engine, DELTA, prompts=PROMPTS[:2], prompt_logprobs=1)
    for c, d in zip(cum, dl):
        assert d[0].prompt_logprobs == c[-1].prompt_logprobs
        assert len(d[0].prompt_logprobs) == len(c[-1].prompt_token_ids)
        assert all(o.prompt_logprobs is None for o in d[1:])


def test_final_only_gives_one_output_equal_to_the_cumulative_final(llm):
    cumulative = _run(llm.engine, CUMULATIVE, stop=["e t"])
    final = _run(llm.engine, FINAL_ONLY, stop=["e t"])
    for cum, fin in zip(cumulative, final):
        assert len(fin) == 1 and fin[0].finished
        assert [(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in fin[0].outputs] == \
               [(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in cum[-1].outputs]


def test_generate_asks_for_final_only_without_changing_the_callers_params(llm):
    params = _params(CUMULATIVE, stop=["e t"])
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert params.output_kind is CUMULATIVE
    expected = _run(llm.engine, CUMULATIVE, stop=["e t"])
    assert [o.outputs[0].text for o in outs] == [e[-1].outputs[0].text for e in expected]
    assert [o.outputs[0].token_ids for o in outs] == [e[-1].outputs[0].token_ids for e in expected]


def test_output_kind_validation():
    assert SamplingParams(output_kind=1).output_kind is DELTA
    with pytest.raises(InvalidRequestError, match="output_kind"):
        SamplingParams(output_kind="delta")
    with pytest.raises(InvalidRequestError, match="output_kind"):
        SamplingParams(output_kind=7)
    with pytest.raises(InvalidRequestError, match="best_of > n"):
        SamplingParams(n=1, best_of=3, output_kind=DELTA)
    assert SamplingParams(n=1, best_of=3, output_kind=FINAL_ONLY).best_of == 3


TEXT = "Grüße 🙂 — 日本語で話す 🚀✓ café, and more plain words"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("batched_from", [1, None])  # the batched decoder call, and the default threshold
def test_detokenize_batch_equals_one_by_one(tokenizer, batched_from, monkeypatch):
    import pageant.engine.detokenizer as detok

    if batched_from is not None:
        monkeypatch.setattr(detok, "BATCHED_DECODE_MIN_SEQS", batched_from)
    calls = []
    decode_batch = tokenizer.decode_batch
    monkeypatch.setattr(tokenizer, "decode_batch", lambda *a: calls.append(1) or decode_batch(*a))
    rng = random.Random(0)
    ids = tokenizer.hf_tokenizer.encode(TEXT, add_special_tokens=False)
    special = sorted(tokenizer.all_special_ids)
    streams = [ids[i:] + special + ids[:i] for i in range(0, len(ids), 3)]
    prompt = tokenizer.encode("Say:")

    def seqs():
        out = []
        for k in range(len(streams)):
            params = SamplingParams(skip_special_tokens=k % 2 == 0)
            req = Request(f"r{k}", None, prompt, params, 0, RequestMetrics(0.0), frozenset())
            out.append(req.new_sequence(0, list(prompt), None))
        return out

    one, batch = seqs(), seqs()
    for step in range(max(map(len, streams))):
        live = [k for k in range(len(streams)) if step < len(streams[k]) and rng.random() < 0.9]
        for k in live:
            one[k].token_ids.append(streams[k][step])
            batch[k].token_ids.append(streams[k][step])
        expected = [detokenize_incrementally(tokenizer, one[k], one[k].request.params.skip_special_tokens)
                    for k in live]
        assert detokenize_batch(tokenizer, [batch[k] for k in live]) == expected
    assert [s.text for s in batch] == [s.text for s in one]
    assert any("🙂" in s.text for s in batch)
    assert bool(calls) == (batched_from == 1)
