"""Greedy outputs equal Hugging Face transformers token for token (float32, CPU), for every
supported architecture, alone, in a mixed batch, under preemption and with chunked prefill."""

from __future__ import annotations

import random

import pytest
import torch

from pageant.engine import LLM, SamplingParams

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
MAX_NEW = 12


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 70))] for _ in range(n)]


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == 0


@pytest.fixture(scope="module")
def prompts32():
    return mixed_prompts(32)


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_transformers(make_checkpoint, hf_greedy, arch, prompts32):
    path = make_checkpoint(arch)
    expected = hf_greedy(path, prompts32, MAX_NEW)
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)

    llm = LLM(model=path, max_num_seqs=64, block_size=16)
    # one prompt alone, then all 32 together
    alone = llm.generate([{"prompt_token_ids": prompts32[5]}], sp, use_tqdm=False)
    assert alone[0].outputs[0].token_ids == expected[5]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts32], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert_all_blocks_free(llm)

    # a pool so small that the running batch must be preempted (and recomputed)
    small = LLM(model=path, num_kv_blocks=12, block_size=8, max_num_seqs=16)
    outs = small.generate([{"prompt_token_ids": p} for p in prompts32], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert small.stats()["num_preemptions"] > 0
    assert_all_blocks_free(small)

    # chunked prefill: a token budget smaller than most prompts
    chunked = LLM(model=path, max_num_batched_tokens=16, block_size=4, max_num_seqs=8)
    outs = chunked.generate([{"prompt_token_ids": p} for p in prompts32[:12]], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:12]
    assert_all_blocks_free(chunked)


def test_sharded_checkpoint_loads(make_checkpoint, hf_greedy, prompts32):
    path = make_checkpoint("qwen2", num_shards=3)
    expected = hf_greedy(path, prompts32[:4], MAX_NEW)
    llm = LLM(model=path)
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts32[:4]], sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_text_prompt_and_eos_stop(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    llm = LLM(model=tiny_checkpoint)
    # bias eos up so that the model stops early; HF gets the same bias
    bias = {2: 6.0}
    prompt = "The quick brown fox"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, logit_bias=bias), use_tqdm=False)[0]
    ids = tok(prompt).input_ids
    assert out.prompt_token_ids == ids

    class Bias:
        def __call__(self, input_ids, scores):
            scores[:, 2] += 6.0
            return scores

    from transformers import LogitsProcessorList

    ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40, pad_token_id=0,
                         logits_processor=LogitsProcessorList([Bias()]))[0, len(ids):].tolist()
    if ref[-1] == 2:
        assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].token_ids == ref
    else:
        assert out.outputs[0].token_ids == ref and out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
