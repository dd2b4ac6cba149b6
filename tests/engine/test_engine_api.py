"""LLMEngine / LLM behaviour: validation, abort, failures, stop strings, seeds, n, logprobs."""

from __future__ import annotations

import pytest
import torch

from pageant.engine import (
    LLM, EngineStepError, InvalidRequestError, LLMEngine, RequestOutput, SamplingParams,
)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(model=tiny_checkpoint, max_num_seqs=16, num_kv_blocks=64, block_size=8, max_model_len=256)


@pytest.fixture
def engine(llm):
    yield llm.engine
    assert not llm.engine.has_unfinished_requests()
    assert llm.stats()["num_free_kv_blocks"] == llm.stats()["num_kv_blocks"]


def run_all(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    seen: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


def greedy_text(llm, prompt, n=40):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)[0].outputs[0]


def test_config_resolved_and_stats(engine):
    cfg = engine.config
    assert cfg.max_model_len == 256 and cfg.num_kv_blocks == 64 and cfg.attention_backend == "torch"
    with pytest.raises(Exception):
        cfg.max_model_len = 3  # frozen
    stats = engine.stats()
    for key in ("num_kv_blocks", "num_free_kv_blocks", "kv_cache_usage", "num_preemptions", "num_requests_running",
                "num_requests_waiting", "prompt_tokens_total", "generation_tokens_total", "block_size"):
        assert key in stats
    assert engine.model_name.startswith("ckpt-llama")
    assert engine.tokenizer.eos_token_id == 2


@pytest.mark.parametrize(
    "prompt, params, fragment",
    [
        ("", SamplingParams(), "empty"),
        ([], SamplingParams(), "empty"),
        ([1, 99999], SamplingParams(), "vocabulary"),
        ([1, -1], SamplingParams(), "vocabulary"),
        ({"foo": 1}, SamplingParams(), "prompt"),
        (3.5, SamplingParams(), "prompt"),
        ([1] * 250, SamplingParams(max_tokens=10), "context"),
        ([1] * 300, SamplingParams(max_tokens=1), "context"),
        ([1, 5], SamplingParams(logit_bias={100000: 1}), "logit_bias"),
    ],
)
def test_add_request_rejects(engine, prompt, params, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


def test_request_larger_than_pool_and_duplicate_ids(tiny_checkpoint):
    small = LLMEngine.from_kwargs(model=tiny_checkpoint, num_kv_blocks=4, block_size=8)
    with pytest.raises(InvalidRequestError, match="blocks"):
        small.add_request("x", [1] * 20, SamplingParams(max_tokens=20))
    small.add_request("ok", [1] * 20, SamplingParams(max_tokens=5))
    with pytest.raises(InvalidRequestError, match="duplicate"):
        small.add_request("ok", [1, 2], SamplingParams())
    small.abort_request("ok")
    assert small.stats()["num_free_kv_blocks"] == 4


def test_abort_frees_blocks_at_once(engine):
    engine.add_request("a", [1, 5, 6, 7, 8, 9, 10, 11, 12, 13], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [1, 5, 6], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats()["num_free_kv_blocks"] < 64
    engine.abort_request(["a", "unknown"])
    engine.abort_request("b")
    assert engine.stats()["num_free_kv_blocks"] == 64 and not engine.has_unfinished_requests()
    assert engine.step() == []


def test_step_failure_fails_only_that_batch(engine, monkeypatch):
    engine.add_request("doomed", [1, 5, 6], SamplingParams(max_tokens=5))
    original = engine.runner.execute

    def boom(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine.runner, "execute", boom)
    with pytest.raises(EngineStepError) as info:
        engine.step()
    assert info.value.request_ids == ["doomed"]
    assert not engine.has_unfinished_requests()
    monkeypatch.setattr(engine.runner, "execute", original)
    engine.add_request("fine", [1, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
    outs = run_all(engine)
    assert outs["fine"][-1].finished and len(outs["fine"][-1].outputs[0].token_ids) == 3


def test_outputs_are_cumulative_with_metrics(engine):
    engine.add_request("s", "Hello there", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    outs = run_all(engine)["s"]
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
    assert [o.finished for o in outs] == [False] * 5 + [True]
    m = outs[-1].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert outs[-1].outputs[0].finish_reason == "length" and outs[0].outputs[0].finish_reason is None


def test_stop_string_across_token_boundary(llm, engine):
    prompt = "The function returns"
    full = greedy_text(llm, prompt)
    tok = engine.tokenizer
    ids = full.token_ids
    # find a boundary between two tokens that both decode to clean text
    for k in range(2, len(ids) - 1):
        before, after = tok.decode(ids[:k]), tok.decode(ids[: k + 1])
        prev = tok.decode(ids[: k - 1])
        if "\ufffd" in after or len(before) - len(prev) < 1 or len(after) - len(before) < 1:
            continue
        stop = before[-1] + after[len(before)]
        if full.text.find(stop) == len(before) - 1:
            break
    else:
        pytest.fail("no clean token boundary in this output: pick another prompt")
    cut = len(before) - 1
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=["never-there", stop])
    engine.add_request("stop", prompt, params)
    outs = run_all(engine)["stop"]
    final = outs[-1].outputs[0]
    assert final.text == full.text[:cut]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.token_ids == ids[: k + 1]
    for o in outs:  # streamed text never shows what the stop string later removes
        assert final.text.startswith(o.outputs[0].text)
    included = llm.generate(prompt, params.clone(include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert included.text == full.text[: cut + 2]


def test_stop_token_ids_and_eos(llm):
    full = greedy_text(llm, "abc", 10)
    target = full.token_ids[4]
    first = full.token_ids.index(target)
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target
    eos = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, logit_bias={2: 100}, min_tokens=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(eos.token_ids) == 4 and eos.token_ids[-1] == 2 and eos.finish_reason == "stop"
    assert eos.stop_reason is None


def test_seeded_sampling_is_reproducible_across_batches(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("Once upon", seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [f"prompt number {i} " * (i + 1) for i in range(7)]
    params = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * 7
    batch = llm.generate(others[:3] + ["Once upon"] + others[3:], params[:3] + [seeded] + params[3:], use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone
    other_seed = llm.generate("Once upon", seeded.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_parallel_sampling_n_and_best_of(llm, engine):
    out = llm.generate("A story", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate("A story", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
                         use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    best = llm.generate("A story", SamplingParams(n=2, best_of=4, temperature=1.0, seed=3, max_tokens=8,
                                                  ignore_eos=True), use_tqdm=False)[0]
    assert len(best.outputs) == 2
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob


def test_logprobs_match_transformers(llm, tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    prompt_ids = [1, 40, 50, 60, 70, 80]
    out = llm.generate({"prompt_token_ids": prompt_ids},
                       SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=1, ignore_eos=True),
                       use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    full = prompt_ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt_ids)
    for pos in range(1, len(prompt_ids)):
        entry = out.prompt_logprobs[pos][prompt_ids[pos]]
        assert abs(entry.logprob - ref[pos - 1, prompt_ids[pos]].item()) < 1e-4
        assert entry.rank == int((ref[pos - 1] > ref[pos - 1, prompt_ids[pos]]).sum()) + 1
    for i, tid in enumerate(out.outputs[0].token_ids):
        lp = out.outputs[0].logprobs[i]
        assert lp[tid].rank == 1 and abs(lp[tid].logprob - ref[len(prompt_ids) - 1 + i, tid].item()) < 1e-4
        assert len(lp) == 2 and lp[tid].decoded_token is not None
    assert abs(out.outputs[0].cumulative_logprob - sum(out.outputs[0].logprobs[i][t].logprob
                                                       for i, t in enumerate(out.outputs[0].token_ids))) < 1e-4


def test_max_tokens_none_runs_to_context_limit(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, max_model_len=24, num_kv_blocks=8, block_size=8)
    out = llm.generate({"prompt_token_ids": [1, 5, 6, 7]}, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 20 and out.finish_reason == "length"


def test_chat_and_priority(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    ids = llm.tokenizer.encode("<|user|>\nhi</s>\n<|assistant|>\n")
    assert out.prompt_token_ids == ids and ids.count(1) == 1
    outs = llm.generate(["a", "b"], SamplingParams(max_tokens=2), priority=[1, 0], use_tqdm=False)
    assert [o.request_id for o in outs] == sorted(o.request_id for o in outs)
    with pytest.raises(InvalidRequestError):
        llm.chat([{"role": "user"}], SamplingParams(max_tokens=2), use_tqdm=False)


def test_prompt_logprobs_survive_chunked_prefill_and_preemption(tiny_checkpoint, llm):
    prompt = {"prompt_token_ids": [1] + list(range(30, 75))}
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, ignore_eos=True)
    whole = llm.generate(prompt, params, use_tqdm=False)[0]
    chunked = LLM(model=tiny_checkpoint, max_num_batched_tokens=7, num_kv_blocks=13, block_size=4)
    # the short request arrives first, so the long one is the newest and gets preempted
    part = chunked.generate([{"prompt_token_ids": [9]}, prompt], [params.clone(max_tokens=30), params],
                            use_tqdm=False)[::-1]
    assert len(part[0].prompt_logprobs) == 46 and part[0].prompt_logprobs[0] is None
    for a, b in zip(whole.prompt_logprobs[1:], part[0].prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        for tid in a:
            assert abs(a[tid].logprob - b[tid].logprob) < 1e-4 and a[tid].rank == b[tid].rank
    assert part[0].outputs[0].token_ids == whole.outputs[0].token_ids
    assert part[1].prompt_logprobs == [None]
    assert chunked.stats()["num_preemptions"] > 0


def test_bfloat16_runs(tiny_checkpoint):
    llm = LLM(model=tiny_checkpoint, dtype="bfloat16", num_kv_blocks=32, block_size=8)
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    out = llm.generate(["hello", "a longer prompt here"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 5 for o in out)
    assert llm.stats()["num_free_kv_blocks"] == 32
