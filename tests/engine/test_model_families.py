"""Every model family on the shared layers equals Hugging Face transformers token for token
(greedy, float32, CPU): alone, 32 mixed prompts batched, under preemption, with chunked prefill
and with prefix caching (a second pass over prompts sharing prefixes hits the cache)."""

from __future__ import annotations

import random

import pytest

from pageant.engine import LLM, SamplingParams

FAMILIES = {
    "gpt_neox": {}, "gpt_neox_sequential": {"use_parallel_residual": False},
    "falcon": {}, "falcon7b": {}, "falcon_rw": {"multi_query": False, "parallel_attn": False, "bias": True},
    "mixtral": {}, "gemma2": {}, "phi3": {},
    # a window well inside the prompts: every layer attends its last 16 positions only
    "mistral_window": {"sliding_window": 16},
}
MAX_NEW = 12


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 70))] for _ in range(n)]


def shared_prefix_prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [1] + [rng.randrange(3, 500) for _ in range(40)]
    return [prefix + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 20))] for _ in range(n)]


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_family_matches_transformers(make_checkpoint, hf_greedy, name):
    arch = {"gpt_neox_sequential": "gpt_neox", "falcon_rw": "falcon7b", "mistral_window": "mistral"}.get(name, name)
    path = make_checkpoint(arch, **FAMILIES[name])
    prompts = mixed_prompts(32)
    expected = hf_greedy(path, prompts, MAX_NEW)

    llm = LLM(model=path, max_num_seqs=64, block_size=16)
    assert generate(llm, [prompts[5]]) == [expected[5]]
    assert generate(llm, prompts) == expected
    assert_all_blocks_free(llm)

    small = LLM(model=path, num_kv_blocks=12, block_size=8, max_num_seqs=16)
    assert generate(small, prompts) == expected
    assert small.stats()["num_preemptions"] > 0
    assert_all_blocks_free(small)

    chunked = LLM(model=path, max_num_batched_tokens=16, block_size=4, max_num_seqs=8)
    assert generate(chunked, prompts[:12]) == expected[:12]
    assert_all_blocks_free(chunked)

    shared = shared_prefix_prompts(8)
    expected_shared = hf_greedy(path, shared, MAX_NEW)
    cached = LLM(model=path, enable_prefix_caching=True, block_size=8, max_num_seqs=4)
    assert generate(cached, shared) == expected_shared
    assert generate(cached, shared) == expected_shared  # every prompt's full blocks now come from the cache
    assert cached.stats()["prefix_cache_hits"] > 0
    assert_all_blocks_free(cached)
