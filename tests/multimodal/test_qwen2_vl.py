"""Qwen2-VL (its vision transformer with 2x2 patch merge, Qwen2 with M-RoPE) through the offline
engine: Hugging Face's greedy tokens for one and several images of different sizes batched with
text, whole and under chunked prefill with prefix caching."""

from __future__ import annotations

import numpy as np
import pytest

from pageant.engine import LLM, SamplingParams
from pageant.engine.multimodal.processor import load_hf_processor

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
ONE = f"<|user|>\nDescribe {IMG} briefly.</s>\n<|assistant|>\n"
TWO = f"<|user|>\n{IMG} or {IMG}: which is brighter?</s>\n<|assistant|>\n"


@pytest.fixture(scope="module")
def cases(images):
    return [(ONE, [images[0]]), (TWO, [images[1], images[4]]), ("Plain text, no image", []), (ONE, [images[2]])]


@pytest.fixture(scope="module")
def expected(qwen2_vl_path, hf_vlm_greedy, cases):
    return [hf_vlm_greedy(qwen2_vl_path, p, imgs) for p, imgs in cases]


def _run(llm, cases):
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} if imgs else p for p, imgs in cases]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_mrope_positions_match_transformers(qwen2_vl_path, images):
    import torch
    import transformers

    llm = LLM(qwen2_vl_path)
    mm = llm.engine.mm_processor.process(TWO, [images[1], images[4]])
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_path, dtype=torch.float32)
    inputs = load_hf_processor(qwen2_vl_path)(text=[TWO], images=[images[1], images[4]], return_tensors="pt")
    positions, delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               inputs["image_grid_thw"])
    assert np.array_equal(mm.mrope_positions, positions[:, 0].numpy()) and mm.mrope_delta == int(delta)
    assert mm.mrope_delta != 0 and [it.length for it in mm.items] == [int(g.prod()) // 4 for g in inputs["image_grid_thw"]]


def test_images_and_text_equal_hf(qwen2_vl_path, cases, expected):
    assert _run(LLM(qwen2_vl_path), cases) == expected
    assert expected[0] != expected[3]


def test_chunked_prefill_with_prefix_caching_equal_hf(qwen2_vl_path, cases, expected):
    llm = LLM(qwen2_vl_path, max_num_batched_tokens=5, max_num_seqs=2, enable_prefix_caching=True, block_size=4)
    assert _run(llm, cases) == expected
    cache = llm.engine.runner.encoder_cache
    assert cache.num_encoded_images == 4 and cache.num_hits > 0
    assert _run(llm, cases[:1]) == expected[:1] and llm.stats()["prefix_cache_hits"] > 0  # same image: cached KV
