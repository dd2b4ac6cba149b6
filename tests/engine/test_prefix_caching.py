"""Automatic prefix caching end to end: greedy outputs equal Hugging Face transformers (float32,
CPU) with caching on, alone, in batches sharing prefixes, under preemption, with chunked prefill and
with n > 1; hits are counted exactly; salts and adapters never share; nothing leaks."""

from __future__ import annotations

import random

import pytest

from pageant.engine import LLM, EngineStepError, InvalidRequestError, LoRARequest, SamplingParams

MAX_NEW = 8
SP = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def shared_prefix_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts over three system prompts (20, 37 and 50 tokens) plus 1..20 own tokens; two of
    them are exact duplicates of earlier ones."""
    rng = random.Random(seed)
    prefixes = [[1] + [rng.randrange(3, 500) for _ in range(k - 1)] for k in (20, 37, 50)]
    prompts = [prefixes[i % 3] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 21))] for i in range(n)]
    return prompts[:-2] + [list(prompts[0]), list(prompts[4])]


def ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def assert_all_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0
    bm = llm.engine.block_manager
    assert sum(bm.ref_counts) == 0


@pytest.fixture(scope="module")
def case(tiny_checkpoint, hf_greedy):
    prompts = shared_prefix_prompts(14)
    return tiny_checkpoint, prompts, hf_greedy(tiny_checkpoint, prompts, MAX_NEW)


def test_outputs_equal_hf_with_caching(case):
    path, prompts, expected = case
    llm = LLM(model=path, enable_prefix_caching=True, block_size=4)
    first = llm.generate(ids(prompts[:1]), SP, use_tqdm=False)  # alone, then all (mostly hits)
    assert tokens(first) == expected[:1]
    assert tokens(llm.generate(ids(prompts), SP, use_tqdm=False)) == expected
    stats = llm.stats()
    assert stats["enable_prefix_caching"] and stats["prefix_cache_hits"] > 0
    assert stats["prefix_cache_queries"] == sum(map(len, prompts[:1] + prompts))
    assert_all_free(llm)
    # everything again: the cache now holds every prompt's leading full blocks
    hits = stats["prefix_cache_hits"]
    assert tokens(llm.generate(ids(prompts), SP, use_tqdm=False)) == expected
    assert llm.stats()["prefix_cache_hits"] - hits == sum((len(p) - 1) // 4 * 4 for p in prompts)
    assert_all_free(llm)


def test_preemption_and_chunked_prefill_with_caching_equal_hf(case):
    path, prompts, expected = case
    small = LLM(model=path, enable_prefix_caching=True, num_kv_blocks=14, block_size=8, max_num_seqs=8)
    assert tokens(small.generate(ids(prompts), SP, use_tqdm=False)) == expected
    assert small.stats()["num_preemptions"] > 0 and small.stats()["prefix_cache_hits"] > 0
    assert_all_free(small)
    chunked = LLM(model=path, enable_prefix_caching=True, max_num_batched_tokens=16, block_size=4, max_num_seqs=4)
    assert tokens(chunked.generate(ids(prompts), SP, use_tqdm=False)) == expected
    assert chunked.stats()["prefix_cache_hits"] > 0
    assert_all_free(chunked)


def test_exact_hits_on_three_shared_blocks(tiny_checkpoint, hf_greedy):
    rng = random.Random(5)
    shared = [1] + [rng.randrange(3, 500) for _ in range(47)]  # 3 full blocks of 16
    a = shared + [rng.randrange(3, 500) for _ in range(12)]
    b = shared + [rng.randrange(3, 500) for _ in range(10)]
    expected = hf_greedy(tiny_checkpoint, [a, b], MAX_NEW)
    for together in (False, True):  # one after the other, or admitted in the same step
        llm = LLM(model=tiny_checkpoint, enable_prefix_caching=True, block_size=16)
        if together:
            outs = llm.generate(ids([a, b]), SP, use_tqdm=False)
        else:
            outs = llm.generate(ids([a]), SP, use_tqdm=False) + llm.generate(ids([b]), SP, use_tqdm=False)
        assert tokens(outs) == expected
        stats = llm.stats()
        assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (len(a) + len(b), 48)
    off = LLM(model=tiny_checkpoint, block_size=16)
    assert tokens(off.generate(ids([a, b]), SP, use_tqdm=False)) == expected
    assert (off.stats()["prefix_cache_queries"], off.stats()["prefix_cache_hits"]) == (0, 0)


def test_parallel_sampling_with_caching(case):
    path, prompts, expected = case
    llm = LLM(model=path, enable_prefix_caching=True, block_size=4)
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, n=3)
    for _ in range(2):  # the second time the prompt's blocks are cached
        (out,) = llm.generate(ids(prompts[1:2]), sp, use_tqdm=False)
        assert [c.token_ids for c in out.outputs] == [expected[1]] * 3
    assert_all_free(llm)
    # seeded sampling gives the same samples with and without caching
    seeded = SamplingParams(temperature=0.8, max_tokens=MAX_NEW, ignore_eos=True, n=2, seed=7)
    off = LLM(model=path, block_size=4)
    want = [c.token_ids for c in off.generate(ids(prompts[1:2]), seeded, use_tqdm=False)[0].outputs]
    got = [c.token_ids for c in llm.generate(ids(prompts[1:2]), seeded, use_tqdm=False)[0].outputs]
    assert got == want


def test_cache_salt_separates_requests(tiny_checkpoint):
    prompt = [1] + list(range(10, 40))  # 31 tokens: 7 full blocks of 4 can be reused
    llm = LLM(model=tiny_checkpoint, enable_prefix_caching=True, block_size=4)
    hits = []
    for salt in ["a", "b", None, "a", None, "b"]:
        llm.generate(ids([prompt]), SP, cache_salt=salt, use_tqdm=False)
        hits.append(llm.stats()["prefix_cache_hits"])
    assert hits == [0, 0, 0, 28, 56, 84]
    llm.reset_prefix_cache()  # nothing is found after a reset
    llm.generate(ids([prompt]), SP, cache_salt="a", use_tqdm=False)
    # the 38 computed tokens (31 prompt + 7 of the 8 outputs) fill 9 blocks, cached again
    assert llm.stats()["prefix_cache_hits"] == 84 and llm.stats()["num_cached_kv_blocks"] == 9
    with pytest.raises(InvalidRequestError):
        llm.generate(ids([prompt]), SP, cache_salt="", use_tqdm=False)
    with pytest.raises(InvalidRequestError):
        llm.engine.add_request("bad", ids([prompt])[0], SP, cache_salt=3)
    assert_all_free(llm)


def test_prompt_logprobs_are_computed_not_cached(case):
    path, prompts, _ = case
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    off = LLM(model=path, block_size=4)
    want = off.generate(ids(prompts[:2]), sp, use_tqdm=False)
    llm = LLM(model=path, enable_prefix_caching=True, block_size=4)
    llm.generate(ids(prompts[:2]), SP, use_tqdm=False)  # fill the cache
    got = llm.generate(ids(prompts[:2]), sp, use_tqdm=False)
    for g, w in zip(got, want):
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(g.prompt_token_ids)
        for gp, wp in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert gp.keys() == wp.keys()
            assert all(abs(gp[t].logprob - wp[t].logprob) < 1e-4 for t in gp)
    assert_all_free(llm)


def test_aborts_leak_no_blocks(case):
    path, prompts, _ = case
    llm = LLM(model=path, enable_prefix_caching=True, block_size=4, max_num_batched_tokens=32, max_num_seqs=4)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, SP)
    for _ in range(4):  # some prefilling, some decoding, some still waiting
        engine.step()
    assert engine.stats()["num_requests_waiting"] > 0
    engine.abort_request([f"r{i}" for i in range(len(prompts))])
    assert not engine.has_unfinished_requests()
    assert_all_free(llm)
    assert engine.stats()["num_cached_kv_blocks"] > 0  # cached-free blocks count as free


def test_failed_step_does_not_leave_unwritten_blocks_in_the_cache(case, monkeypatch):
    path, prompts, expected = case
    llm = LLM(model=path, enable_prefix_caching=True, block_size=4)
    engine = llm.engine
    real = engine.runner.execute

    def broken(so, inp):
        raise RuntimeError("device fault")

    monkeypatch.setattr(engine.runner, "execute", broken)
    engine.add_request("doomed", {"prompt_token_ids": prompts[2]}, SP)
    with pytest.raises(EngineStepError):
        engine.step()
    assert engine.stats()["num_cached_kv_blocks"] == 0
    assert_all_free(llm)
    monkeypatch.setattr(engine.runner, "execute", real)
    assert tokens(llm.generate(ids(prompts[2:3]), SP, use_tqdm=False)) == expected[2:3]
    assert llm.stats()["prefix_cache_hits"] == 0


def test_adapters_never_share_cached_blocks(tiny_checkpoint, hf_greedy, tmp_path):
    from pageant.engine.adapters.testing import build_lora_adapter

    prompt = [1] + list(range(20, 50))
    path_a = str(build_lora_adapter(tiny_checkpoint, tmp_path / "a", r=4, seed=1))
    want_base, want_a = hf_greedy(tiny_checkpoint, [prompt], MAX_NEW), hf_greedy(tiny_checkpoint, [prompt], MAX_NEW, adapter=path_a)
    llm = LLM(model=tiny_checkpoint, enable_prefix_caching=True, block_size=4, enable_lora=True, max_lora_rank=8)
    req_a = LoRARequest("a", 1, path_a)
    assert tokens(llm.generate(ids([prompt]), SP, use_tqdm=False)) == want_base
    assert tokens(llm.generate(ids([prompt]), SP, lora_request=req_a, use_tqdm=False)) == want_a
    assert llm.stats()["prefix_cache_hits"] == 0
    assert tokens(llm.generate(ids([prompt]), SP, lora_request=req_a, use_tqdm=False)) == want_a
    assert llm.stats()["prefix_cache_hits"] == 28
    # the same name, id and path with new weights: the old entries are not served
    assert llm.engine.remove_lora("a")
    build_lora_adapter(tiny_checkpoint, tmp_path / "a", r=4, seed=2)
    want_a2 = hf_greedy(tiny_checkpoint, [prompt], MAX_NEW, adapter=path_a)
    assert want_a2 != want_a
    assert tokens(llm.generate(ids([prompt]), SP, lora_request=req_a, use_tqdm=False)) == want_a2
    assert llm.stats()["prefix_cache_hits"] == 28
    assert_all_free(llm)


def test_random_traffic_with_aborts_preemption_and_eviction(case):
    """Requests over shared prefixes arrive and are aborted at random on a pool small enough to
    preempt and evict; after every step the bookkeeping is consistent and each block's count is
    the number of live sequences holding it; every finished greedy sample equals Hugging Face."""
    path, prompts, expected = case
    llm = LLM(model=path, enable_prefix_caching=True, num_kv_blocks=24, block_size=4, max_num_seqs=6,
              max_num_batched_tokens=40)
    engine, bm, rng = llm.engine, llm.engine.block_manager, random.Random(3)
    sp = {1: SP, 2: SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, n=2)}
    which, finished, aborted, next_id = {}, {}, set(), 0
    for step in range(400):
        if next_id < 60 and rng.random() < 0.5:
            which[f"q{next_id}"] = i = rng.randrange(len(prompts))
            engine.add_request(f"q{next_id}", {"prompt_token_ids": prompts[i]}, sp[rng.choice((1, 1, 2))])
            next_id += 1
        live = [rid for rid in engine.requests]
        if live and rng.random() < 0.04:
            rid = rng.choice(live)
            engine.abort_request(rid)
            aborted.add(rid)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        bm.check_invariants()
        held = [0] * bm.num_blocks
        for request in engine.requests.values():
            for seq in request.seqs:
                for block in seq.block_table:
                    held[block] += 1
        assert held == bm.ref_counts, step
        if next_id >= 60 and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests() and len(finished) + len(aborted) == 60
    stats = llm.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0 and len(finished) > 30
    for rid, out in finished.items():
        assert [c.token_ids for c in out.outputs] == [expected[which[rid]]] * len(out.outputs), rid
    assert_all_free(llm)
