"""Speculative decoding with the rest of the engine: stop tokens, stop strings and max_tokens inside
an accepted run, logprobs of the emitted tokens, penalties, seeded sampling, several tokens per
step, aborts, LoRA, structured outputs (masked per verified position), metrics, CLI."""

from __future__ import annotations

import random

import pytest

from pageant.engine import LLM, SamplingParams, StructuredOutputsParams
from pageant.engine.lora import LoRARequest

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def prompts(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 6))]
        out.append({"prompt_token_ids": [1] + phrase * 4})
    return out


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    """(speculating LLM, plain LLM) on the same checkpoint."""
    return LLM(model=tiny_checkpoint, speculative_config=NGRAM), LLM(model=tiny_checkpoint)


def assert_clean(llm: LLM) -> None:
    s = llm.stats()
    assert s["num_free_kv_blocks"] == s["num_kv_blocks"]
    llm.engine.block_manager.check_invariants()


def outputs(llm, ps, sp, **kw):
    return [o.outputs[0] for o in llm.generate(ps, sp, use_tqdm=False, **kw)]


def test_stops_inside_an_accepted_run_end_there(pair):
    spec, plain = pair
    ps = prompts(8)
    free = outputs(plain, ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    # stop on a token and on a string that the greedy outputs contain mid-way; odd max_tokens
    stop_ids = [c.token_ids[9] for c in free[:4]]
    stop_strs = [c.text[len(c.text) // 2 : len(c.text) // 2 + 3] for c in free[4:] if len(c.text) > 8]
    for sp in (SamplingParams(temperature=0, max_tokens=24, stop_token_ids=stop_ids, ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=24, stop=stop_strs, ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=24, stop=stop_strs, include_stop_str_in_output=True,
                              ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
               SamplingParams(temperature=0, max_tokens=24)):  # EOS on
        got, want = outputs(spec, ps, sp), outputs(plain, ps, sp)
        assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in got] == \
               [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in want]
    assert spec.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_clean(spec)


def test_logprobs_and_penalties_match_plain_decoding(pair):
    spec, plain = pair
    ps = prompts(4, seed=2)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, frequency_penalty=0.3,
                        repetition_penalty=1.1, logit_bias={5: 2.0}, min_tokens=5)
    got, want = outputs(spec, ps, sp), outputs(plain, ps, sp)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-4)
        for lg, lw in zip(g.logprobs, w.logprobs):
            assert list(lg) == list(lw)  # the same tokens (chosen + top 3), in the same order
            assert [x.rank for x in lg.values()] == [x.rank for x in lw.values()]
            assert [x.logprob for x in lg.values()] == pytest.approx([x.logprob for x in lw.values()], abs=1e-4)
    assert_clean(spec)


def test_seeded_sampling_is_reproducible(tiny_checkpoint):
    ps = prompts(4, seed=3)
    sp = [SamplingParams(temperature=0.3, top_k=20, max_tokens=24, seed=s, ignore_eos=True) for s in range(4)]
    runs = []
    for order in (False, True):  # alone-ish vs another batch order: seeded rows use their own draws
        llm = LLM(model=tiny_checkpoint, speculative_config=NGRAM)
        got = outputs(llm, ps[::-1] if order else ps, sp[::-1] if order else sp)
        runs.append([c.token_ids for c in (got[::-1] if order else got)])
        assert llm.stats()["spec_decode_num_drafts"] > 0
        assert_clean(llm)
    assert runs[0] == runs[1]
    n2 = LLM(model=tiny_checkpoint, speculative_config=NGRAM)
    many = n2.generate(ps[0], SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=1), use_tqdm=False)
    assert len(many[0].outputs) == 3
    assert_clean(n2)


def test_several_tokens_per_step_and_abort(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, speculative_config=NGRAM)
    engine = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(prompts(3, seed=4)):
        engine.add_request(f"r{i}", p, sp)
    seen, most = {}, 0
    for _ in range(6):
        for out in engine.step():
            n = len(out.outputs[0].token_ids)
            most = max(most, n - seen.get(out.request_id, 0))
            seen[out.request_id] = n
    assert most > 1  # some step delivered several tokens to one request
    engine.abort_request(["r0", "r1", "r2"])  # mid-run
    assert not engine.has_unfinished_requests()
    assert_clean(llm)


def test_lora_requests_speculate_exactly(tiny_checkpoint, make_adapter):
    adapter = make_adapter(tiny_checkpoint, r=4, alpha=8, seed=21)
    lora = LoRARequest("a", 1, adapter)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ps = prompts(4, seed=5)
    spec = LLM(model=tiny_checkpoint, enable_lora=True, speculative_config=NGRAM)
    plain = LLM(model=tiny_checkpoint, enable_lora=True)
    loras = [lora, None, lora, None]
    got = [c.token_ids for c in outputs(spec, ps, sp, lora_request=loras)]
    assert got == [c.token_ids for c in outputs(plain, ps, sp, lora_request=loras)]
    assert spec.stats()["spec_decode_num_drafts"] > 0
    assert_clean(spec)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_constrained_requests_speculate_exactly(tiny_checkpoint, backend):
    """Each verified position is masked by the grammar after the proposals before it; outputs
    equal plain constrained decoding, proposals are made and accepted, and a constraint that
    completes inside an accepted run ends the request right there with "stop"."""
    cfg = {"backend": backend}
    spec = LLM(model=tiny_checkpoint, speculative_config=NGRAM, structured_outputs_config=cfg)
    plain = LLM(model=tiny_checkpoint, structured_outputs_config=cfg)
    cases = [StructuredOutputsParams(regex="(ab|cd){2,12}", disable_any_whitespace=True),
             StructuredOutputsParams(regex="(ab){5}"),  # completes after exactly five repeats
             StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"]}, disable_any_whitespace=True)]
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for so in cases:
        sp = SamplingParams(temperature=0, max_tokens=24, structured_outputs=so)
        mixed = [sp, free, sp, sp]  # constrained rows next to free ones, in the same steps
        before = spec.stats()
        got, want = outputs(spec, prompts(4, seed=8), mixed), outputs(plain, prompts(4, seed=8), mixed)
        assert [(c.text, c.token_ids, c.finish_reason) for c in got] == \
            [(c.text, c.token_ids, c.finish_reason) for c in want], so
        after = spec.stats()
        assert after["spec_decode_num_draft_tokens"] > before["spec_decode_num_draft_tokens"]
        assert after["spec_decode_num_accepted_tokens"] > before["spec_decode_num_accepted_tokens"]
        assert_clean(spec)
    only = SamplingParams(temperature=0, max_tokens=24, structured_outputs=cases[1])
    before = spec.stats()["spec_decode_num_accepted_tokens"]
    (c,) = outputs(spec, prompts(1, seed=9), only)
    assert c.text == "ababababab" and c.finish_reason == "stop"
    assert spec.stats()["spec_decode_num_accepted_tokens"] > before  # the repeats came from accepted proposals


def test_metrics_and_cli(pair):
    from pageant.engine.server.cli_args import build_parser, engine_kwargs
    from pageant.engine.server.metrics import ServerMetrics

    spec, plain = pair
    outputs(spec, prompts(2, seed=7), SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    stats = spec.stats()
    text = ServerMetrics("m", lambda: stats).render().decode()
    assert f'vllm:spec_decode_num_drafts_total{{model_name="m"}} {float(stats["spec_decode_num_drafts"])}' in text
    for name in ("num_draft_tokens", "num_accepted_tokens"):
        assert f'vllm:spec_decode_{name}_total{{model_name="m"}} {float(stats["spec_decode_" + name])}' in text
    per_pos = stats["spec_decode_num_accepted_tokens_per_pos"]
    assert f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="0"}} {float(per_pos[0])}' \
        in text
    assert "spec_decode" not in ServerMetrics("m", plain.stats).render().decode()
    args = build_parser().parse_args(["--model", "x", "--speculative-config", '{"method": "ngram", '
                                      '"num_speculative_tokens": 2}'])
    assert engine_kwargs(args)["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 2}


def test_server_streams_every_speculated_token(serve):
    """`pageant serve --speculative-config`: a stream delivers all tokens (several per step), equal to
    the non-streamed answer; /metrics has the spec-decode counters."""
    import json

    import httpx

    server = serve("--speculative-config", json.dumps(NGRAM))
    base = server.base_url
    model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": "one two three one two three one two three one two", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "logprobs": 1}
    full = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()["choices"][0]
    texts, tokens, chunks = [], 0, 0
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts.append(choice["text"])
                tokens += len(choice["logprobs"]["tokens"]) if choice.get("logprobs") else 0
                chunks += 1
    assert "".join(texts) == full["text"]
    assert tokens == len(full["logprobs"]["tokens"]) == 24
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    drafts = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0
    assert chunks < 24  # some chunk carried several tokens (speculation accepted some)
