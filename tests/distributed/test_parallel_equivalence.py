"""Tensor and pipeline parallelism on the CPU (gloo): greedy outputs equal Hugging Face
transformers token for token (float32), batched, under preemption, with chunked prefill and with
prefix caching, for every family the issue names (and Falcon-7B's multi-query layout, whose one KV
head is replicated on both ranks; Phi-3's fused projections)."""

from __future__ import annotations

import pytest

from pageant.engine import LLM, SamplingParams
from tests.engine.test_model_families import mixed_prompts, shared_prefix_prompts

MAX_NEW = 10


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                         use_tqdm=False)]


def check_engine(llm: LLM, path: str, hf_greedy, *, expect_preemption: bool = True) -> None:
    prompts = mixed_prompts(20)
    assert generate(llm, prompts) == hf_greedy(path, prompts, MAX_NEW)
    shared = shared_prefix_prompts(6)
    expected = hf_greedy(path, shared, MAX_NEW)
    assert generate(llm, shared) == expected
    assert generate(llm, shared) == expected  # the prompts' full blocks now come from the prefix cache
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0
    if expect_preemption:
        assert stats["num_preemptions"] > 0
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


# a pool of 14 blocks of 8 tokens cannot hold 16 sequences of up to ~70 tokens: preemption
SMALL_POOL = dict(num_kv_blocks=14, block_size=8, max_num_seqs=16, enable_prefix_caching=True)

TP_FAMILIES = {
    "llama": {}, "qwen2": {}, "qwen3": {}, "mixtral": {},
    "falcon7b": {},  # one KV head, replicated on both ranks
    "phi3": {},  # q/k/v and gate/up fused in the checkpoint
}


@pytest.mark.parametrize("arch", TP_FAMILIES)
def test_tensor_parallel_matches_transformers(make_checkpoint, hf_greedy, arch):
    path = make_checkpoint(arch, **TP_FAMILIES[arch])
    with LLM(model=path, tensor_parallel_size=2, **SMALL_POOL) as llm:
        check_engine(llm, path, hf_greedy)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: the last stage reads its tied head from the embedding
def test_pipeline_parallel_matches_transformers(make_checkpoint, hf_greedy, arch):
    path = make_checkpoint(arch, num_hidden_layers=3)  # stages of 2 and 1 layers
    with LLM(model=path, pipeline_parallel_size=2, max_num_batched_tokens=24, **SMALL_POOL) as llm:  # chunked too
        assert llm.engine.runner.local.num_layers == 1  # rank 0 is the last stage: layer 2 only
        check_engine(llm, path, hf_greedy)


def test_tensor_and_pipeline_parallel_together(make_checkpoint, hf_greedy):
    path = make_checkpoint("llama", num_hidden_layers=3)
    with LLM(model=path, tensor_parallel_size=2, pipeline_parallel_size=2, max_num_batched_tokens=32,
             **SMALL_POOL) as llm:
        runner = llm.engine.runner.local
        assert (runner.parallel.tp_size, runner.parallel.pp_size, runner.parallel.pp_rank) == (2, 2, 1)
        assert runner.num_kv_heads == 1  # 2 KV heads over 2 ranks
        check_engine(llm, path, hf_greedy)


def test_kv_pool_per_rank(make_checkpoint):
    """The same memory holds twice the blocks when each rank keeps half the KV heads."""
    path = make_checkpoint("llama")
    one = LLM(model=path, kv_cache_memory_gib=0.001, max_num_seqs=1024, max_model_len=512)
    with LLM(model=path, tensor_parallel_size=2, kv_cache_memory_gib=0.001, max_num_seqs=1024,
             max_model_len=512) as two:
        assert two.stats()["num_kv_blocks"] == 2 * one.stats()["num_kv_blocks"]
        assert tuple(two.engine.runner.kv_cache.shape[-2:]) == (1, 16)  # [..., kv heads per rank, head_dim]
