"""Speculative decoding in the engine: greedy outputs equal Hugging Face's target model token for
token (float32, CPU) with n-gram and with a draft model, batched, under preemption, with prefix
caching and chunked prefill; rejected proposals leave no trace (every block free, bookkeeping
consistent, acceptance counted)."""

from __future__ import annotations

import random

import pytest

from pageant.engine import LLM, SamplingParams

MAX_NEW = 16


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random phrase (prompt lookup has something to find), and random ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        phrase = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 9))]
        out.append([1] + phrase * rng.randrange(2, 6) if i % 3 else [1] + [rng.randrange(3, 500) for _ in range(20)])
    return out


def check_clean(llm: LLM) -> dict:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0
    llm.engine.block_manager.check_invariants()
    return stats


@pytest.fixture(scope="module")
def target(make_checkpoint):
    return make_checkpoint("llama")


@pytest.fixture(scope="module")
def draft(make_checkpoint):
    """A smaller model with the target's tokenizer (1 layer, hidden 32)."""
    return make_checkpoint("llama", seed=5, num_hidden_layers=1, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def expected(target, hf_greedy):
    prompts = repetitive_prompts(12)
    return prompts, hf_greedy(target, prompts, MAX_NEW)


SP = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def generate(llm: LLM, prompts, sp=SP):
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                         use_tqdm=False)]


@pytest.mark.parametrize("engine_kwargs", [
    {},  # batched
    {"num_kv_blocks": 14, "block_size": 8, "max_num_seqs": 8},  # preemption
    {"enable_prefix_caching": True, "block_size": 4},  # prefix caching (run twice: the second hits)
    {"max_num_batched_tokens": 8, "block_size": 4, "max_num_seqs": 4},  # chunked prefill, budget cuts proposals
])
def test_ngram_greedy_matches_transformers(target, expected, engine_kwargs):
    prompts, want = expected
    llm = LLM(model=target, speculative_config=NGRAM, **engine_kwargs)
    assert generate(llm, prompts) == want
    if engine_kwargs.get("enable_prefix_caching"):
        assert generate(llm, prompts) == want
        assert llm.stats()["prefix_cache_hits"] > 0
    stats = check_clean(llm)
    assert stats["spec_decode_num_accepted_tokens"] > 0  # speculation did happen
    assert stats["spec_decode_num_draft_tokens"] >= stats["spec_decode_num_accepted_tokens"]
    assert sum(stats["spec_decode_num_accepted_tokens_per_pos"]) == stats["spec_decode_num_accepted_tokens"]
    runs = 2 if engine_kwargs.get("enable_prefix_caching") else 1
    assert stats["generation_tokens_total"] == runs * MAX_NEW * len(prompts)
    if "num_kv_blocks" in engine_kwargs:
        assert stats["num_preemptions"] > 0


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"num_kv_blocks": 14, "block_size": 8, "max_num_seqs": 8},
    {"enable_prefix_caching": True, "block_size": 4, "max_num_batched_tokens": 16},
])
def test_draft_model_greedy_matches_transformers(target, draft, expected, engine_kwargs):
    prompts, want = expected
    llm = LLM(model=target, speculative_config={"model": draft, "num_speculative_tokens": 3}, **engine_kwargs)
    assert generate(llm, prompts) == want
    if engine_kwargs.get("enable_prefix_caching"):
        assert generate(llm, prompts) == want
    stats = check_clean(llm)
    assert stats["spec_decode_num_drafts"] > 0
    if "num_kv_blocks" in engine_kwargs:
        assert stats["num_preemptions"] > 0
    # the draft's pool has the target's block ids: as many blocks
    assert llm.engine.spec_decode.draft_proposer.runner.num_kv_blocks == stats["num_kv_blocks"]


def test_draft_model_sampling_is_seeded_and_clean(target, draft, expected):
    prompts, _ = expected
    sp = [SamplingParams(temperature=0.7, top_k=50, max_tokens=MAX_NEW, seed=i, ignore_eos=True) for i in range(6)]
    llm = LLM(model=target, speculative_config={"model": draft, "num_speculative_tokens": 3})
    first, again = generate(llm, prompts[:6], sp), generate(llm, prompts[:6], sp)
    assert first == again
    assert [len(t) for t in first] == [MAX_NEW] * 6
    check_clean(llm)


def test_target_as_its_own_draft_accepts_everything(target, expected):
    prompts, want = expected
    llm = LLM(model=target, speculative_config={"model": target, "num_speculative_tokens": 4})
    assert generate(llm, prompts[:4]) == want[:4]
    stats = check_clean(llm)
    assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0


def test_draft_pool_shares_the_memory_budget(target, draft):
    """Sized from memory, target + draft pools fit the budget the target alone would use."""
    alone = LLM(model=target, kv_cache_memory_gib=0.001, max_num_seqs=256)
    both = LLM(model=target, kv_cache_memory_gib=0.001, max_num_seqs=256,
               speculative_config={"model": draft, "num_speculative_tokens": 2})
    t, d = alone.engine.runner, both.engine.spec_decode.draft_proposer.runner
    assert both.engine.runner.num_kv_blocks < t.num_kv_blocks
    used = both.engine.runner.kv_cache.nbytes + d.kv_cache.nbytes
    assert used <= 0.001 * 2**30


def test_draft_with_another_vocabulary_is_refused(target, make_checkpoint):
    other = make_checkpoint("llama", vocab_size=300)
    with pytest.raises(ValueError, match="same vocabulary"):
        LLM(model=target, speculative_config={"model": other, "num_speculative_tokens": 2})


def test_disable_by_batch_size(target, expected):
    prompts, want = expected
    llm = LLM(model=target, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    assert generate(llm, prompts) == want  # 12 running: no proposals until at most 2 are left
    few = llm.stats()["spec_decode_num_drafts"]
    assert generate(llm, prompts[:1]) == want[:1]
    assert llm.stats()["spec_decode_num_drafts"] > few  # alone, it speculates
    check_clean(llm)


def test_triton_kernels_verify_exactly(target, expected):
    """The Triton extend kernel (interpreted on the CPU) scores the proposals as the torch path does."""
    prompts, want = expected
    llm = LLM(model=target, attention_backend="triton", speculative_config=NGRAM, block_size=16)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert generate(llm, prompts[1:3], sp) == [w[:8] for w in want[1:3]]
    assert check_clean(llm)["spec_decode_num_accepted_tokens"] > 0


def test_tensor_parallel_is_refused(target):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(model=target, speculative_config=NGRAM, tensor_parallel_size=2)
