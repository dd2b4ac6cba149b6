"""Structured outputs offline: every answer satisfies its constraint whatever the (random) weights,
in mixed batches with free requests, under n > 1, seeds, preemption, chunked prefill and prefix
caching; sampling under the mask is the model's distribution renormalised; bad constraints fail
before they enter the engine; the grammar's end ends the request."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from pageant.engine import LLM, InvalidRequestError, SamplingParams, StructuredOutputsParams

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                               "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                                                   "maximum": 9},
                                                                             "y": {"type": "integer", "minimum": -9,
                                                                                   "maximum": 9}},
                                           "required": ["x", "y"], "additionalProperties": False}},
     "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"},
                    "ok": {"type": "boolean"}},
     "required": ["start", "end", "ok"], "additionalProperties": False},
]
PROMPTS = ["Give me JSON:", "The answer is", "hello there"]


def constrained(**kind) -> StructuredOutputsParams:
    return StructuredOutputsParams(disable_any_whitespace=True, **kind)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(model=tiny_checkpoint, max_num_seqs=32)


@pytest.mark.parametrize("schema", range(len(SCHEMAS)))
def test_json_schema_answers_validate(llm, schema):
    sp = SamplingParams(temperature=1.0, seed=schema, n=3, max_tokens=120,
                        structured_outputs=constrained(json=SCHEMAS[schema]))
    for out in llm.generate(PROMPTS, sp, use_tqdm=False):
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMAS[schema])


def test_regex_choice_grammar_json_object(llm):
    cases = [
        (constrained(regex=r"[a-z]{3}-\d{2,4}"), lambda t: re.fullmatch(r"[a-z]{3}-\d{2,4}", t)),
        (constrained(choice=["positive", "negative", "neutral"]), lambda t: t in ("positive", "negative", "neutral")),
        (constrained(grammar='root ::= "yes" | "no" | "maybe " [0-9]'), lambda t: re.fullmatch(r"yes|no|maybe \d", t)),
        (constrained(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    for params, check in cases:
        for seed in range(3):
            sp = SamplingParams(temperature=1.0, seed=seed, max_tokens=80, structured_outputs=params)
            (out,) = llm.generate("Say something:", sp, use_tqdm=False)
            assert out.outputs[0].finish_reason == "stop" and check(out.outputs[0].text), (params.kind, out.outputs[0].text)


def test_mixed_batch_and_engine_modes_agree(tiny_checkpoint, llm):
    """Constrained and free requests in one batch; greedy outputs identical under preemption,
    chunked prefill and prefix caching, and the free requests unchanged by their neighbours."""
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    cons = SamplingParams(temperature=0, max_tokens=80, structured_outputs=constrained(json=SCHEMAS[0]))
    prompts = [f"{p} {i}" for i in range(4) for p in PROMPTS]
    params = [cons if i % 2 else free for i in range(len(prompts))]
    alone_free = [o.outputs[0].token_ids for o in llm.generate(prompts, free, use_tqdm=False)]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    for i, tokens in enumerate(expected):
        if i % 2 == 0:
            assert tokens == alone_free[i]
    for kwargs in (dict(num_kv_blocks=14, block_size=8, max_num_seqs=16), dict(max_num_batched_tokens=8, block_size=4),
                   dict(enable_prefix_caching=True, block_size=4)):
        other = LLM(model=tiny_checkpoint, **kwargs)
        outs = other.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, kwargs
        stats = other.stats()
        assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
        if "num_kv_blocks" in kwargs:
            assert stats["num_preemptions"] > 0


def test_grammar_end_stops_even_with_ignore_eos(llm):
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured_outputs=constrained(choice=["abc"]))
    out = llm.generate("x", sp, use_tqdm=False)[0].outputs[0]
    assert out.text == "abc" and out.finish_reason == "stop"


def test_seeded_constrained_sampling_is_reproducible(llm):
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=60, structured_outputs=constrained(json=SCHEMAS[1]))
    a = llm.generate("seeded", sp, use_tqdm=False)[0].outputs[0].text
    batch = llm.generate(["other", "seeded", "third"], [SamplingParams(temperature=1.0, max_tokens=10), sp,
                                                        SamplingParams(temperature=0.5, max_tokens=5)], use_tqdm=False)
    assert batch[1].outputs[0].text == a


def test_masked_sampling_follows_the_renormalised_distribution():
    """The sampler under a bitmask: frequencies match softmax over the allowed tokens only."""
    from pageant.engine.sampler import SamplingBatch, sample
    from pageant.engine.sequence import Request
    from pageant.engine.outputs import RequestMetrics

    vocab, n = 40, 20000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=g) * 2
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[1, 3, 4, 10, 17, 33, 39]] = True
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    for t in allowed.nonzero()[:, 0].tolist():
        bitmask[0, t // 32] |= (1 << (t % 32)) if t % 32 != 31 else -(1 << 31)
    req = Request("r", None, [1], SamplingParams(temperature=1.0), 0, RequestMetrics(0.0), frozenset())
    seq = req.new_sequence(0, [1], None)
    counts = torch.zeros(vocab)
    batch = SamplingBatch.build([seq] * 500, vocab, torch.device("cpu"))
    for _ in range(n // 500):
        out = sample(logits.repeat(500, 1), batch, g, bitmask.repeat(500, 1))
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=vocab)
    assert counts[~allowed].sum() == 0
    expected = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=0) * n
    chi2 = (((counts - expected) ** 2) / expected.clamp_min(1e-9))[allowed].sum()
    assert chi2 < 24.3  # chi-square, 6 degrees of freedom, p = 0.9995


@pytest.mark.parametrize("params, message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
    (dict(regex="a(b"), "regex"),
    (dict(grammar="root ::= ("), "grammar"),
])
def test_bad_constraints_fail_before_the_engine(llm, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(**params)), use_tqdm=False)
    assert llm.stats()["num_requests_waiting"] == 0


def test_params_validation():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(InvalidRequestError, match="StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_guidance_backend(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, structured_outputs_config={"backend": "guidance"})
    sp = SamplingParams(temperature=1.0, seed=1, max_tokens=80, structured_outputs=constrained(json=SCHEMAS[0]))
    out = llm.generate("x", sp, use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(out.text), SCHEMAS[0])
    lark = StructuredOutputsParams(grammar='start: "id-" /[0-9]{3}/')
    out = llm.generate("y", SamplingParams(temperature=1.0, seed=2, max_tokens=20, structured_outputs=lark),
                       use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"id-\d{3}", out.text) and out.finish_reason == "stop"
    with pytest.raises(InvalidRequestError, match="guidance"):
        llm.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a(b")), use_tqdm=False)


def test_compile_cache_and_waiting_for_a_compile(llm):
    manager = llm.engine.structured_outputs
    a = manager.submit(constrained(json=SCHEMAS[2]))
    b = manager.submit(StructuredOutputsParams(json=json.dumps(SCHEMAS[2]), disable_any_whitespace=True))
    assert a is b  # the same canonical schema hits the cache
    # a request whose grammar is still compiling waits; the free one runs meanwhile
    import concurrent.futures as cf

    from pageant.engine.structured_outputs.manager import GrammarState

    engine = llm.engine
    pending = cf.Future()
    engine.add_request("free", "go", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.add_request("wait", "go", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.requests["wait"].grammar = GrammarState(pending)
    finished = set()
    for _ in range(6):
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert finished == {"free"} and engine.stats()["num_requests_waiting"] == 1
    pending.set_result(manager.submit(constrained(choice=["ok"])).result())  # (backend, grammar, params)
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                assert o.request_id == "wait" and o.outputs[0].text == "ok"


def test_constraint_starts_after_the_reasoning(tiny_checkpoint):
    """With a reasoning parser a sequence is free until its output holds ``</think>``, then constrained."""
    from pageant.engine.outputs import RequestMetrics
    from pageant.engine.sequence import Request

    llm = LLM(model=tiny_checkpoint, structured_outputs_config={"reasoning_parser": "deepseek_r1"})
    manager = llm.engine.structured_outputs
    params = SamplingParams(structured_outputs=constrained(choice=["alpha"]))
    request = Request("r", None, [1], params, 0, RequestMetrics(0.0), frozenset({2}))
    request.grammar = manager.state(params.structured_outputs)
    request.grammar.future.result()
    seq = request.new_sequence(0, [1], None)
    seq.text = "let me think"
    assert manager.bitmask([seq]) is None and manager.accept([seq], [77]) == []  # free while reasoning
    seq.text += "</think>"
    mask = manager.bitmask([seq])
    allowed = [t for t in range(llm.engine.vocab_size) if mask[0, t // 32] >> (t % 32) & 1]
    assert allowed and all(llm.tokenizer.decode([t]) and "alpha".startswith(llm.tokenizer.decode([t])) for t in allowed)
    with pytest.raises(ValueError, match="reasoning parser"):
        LLM(model=tiny_checkpoint, structured_outputs_config={"reasoning_parser": "nope"}).engine.structured_outputs


def test_structural_tag(llm):
    """xgrammar's structural tag (a tagged JSON payload) and vLLM's older structures/triggers form."""
    schema = {"type": "object", "properties": {"q": {"enum": ["a", "b"]}}, "required": ["q"], "additionalProperties": False}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<call>", "end": "</call>",
                                                "content": {"type": "regex", "pattern": "[ab]{3}"}}}
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                        structured_outputs=StructuredOutputsParams(structural_tag=json.dumps(tag)))
    out = llm.generate("x", sp, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"<call>[ab]{3}</call>", out.text) and out.finish_reason == "stop", out.text
    legacy = {"structures": [{"begin": "<f>", "schema": schema, "end": "</f>"}], "triggers": ["<f>"]}
    llm.engine.structured_outputs.validate(StructuredOutputsParams(structural_tag=json.dumps(legacy)))


def test_compile_time_limit(llm):
    big = {"type": "object", "properties": {f"k{i}": {"type": "array", "items": {"enum": [f"v{j}" for j in range(40)]}}
                                            for i in range(400)}}
    with pytest.raises(ValueError, match="did not compile within"):
        llm.engine.structured_outputs.validate(StructuredOutputsParams(json=big), timeout=0.0001)


def test_with_lora_and_stop_strings(make_checkpoint, make_adapter):
    """A constrained request on a LoRA adapter next to a base one; a stop string inside the
    constrained output ends it first (finish_reason stop, the constraint unfinished)."""
    from pageant.engine import LoRARequest

    base = make_checkpoint("llama")
    adapter = LoRARequest("a", 1, make_adapter(base, r=4, targets=("q_proj", "v_proj"), seed=3))
    llm = LLM(model=base, enable_lora=True, max_loras=2, max_lora_rank=4)
    sp = SamplingParams(temperature=1.0, seed=5, max_tokens=80, structured_outputs=constrained(json=SCHEMAS[0]))
    outs = llm.generate(["lora one", "base one"], sp, lora_request=[adapter, None], use_tqdm=False)
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMAS[0])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids
    stopped = llm.generate("x", SamplingParams(temperature=0, max_tokens=80, stop=['"age"'],
                                               structured_outputs=constrained(json=SCHEMAS[0])), use_tqdm=False)[0]
    c = stopped.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == '"age"' and '"age"' not in c.text
