"""LLaVA (CLIP vision tower + Llama) through the offline engine: Hugging Face's greedy tokens for one
and several images batched with text-only prompts, under chunked prefill (chunk boundaries inside
the image tokens: the encoder cache serves the later chunks), preemption and prefix caching."""

from __future__ import annotations

import pytest

from pageant.engine import LLM, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ONE = "<|user|>\nWhat is in <image> this picture?</s>\n<|assistant|>\n"
TWO = "<|user|>\nCompare <image> with <image>, please.</s>\n<|assistant|>\n"
TEXT = "The quick brown fox jumps over"


def _mm(prompt, imgs):
    return {"prompt": prompt, "multi_modal_data": {"image": imgs}} if imgs else prompt


def _tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def cases(images):
    return [(ONE, [images[0]]), (TWO, [images[1], images[2]]), (TEXT, []), (ONE, [images[3]])]


@pytest.fixture(scope="module")
def expected(llava_path, hf_vlm_greedy, cases):
    return [hf_vlm_greedy(llava_path, p, imgs) for p, imgs in cases]


def test_batched_images_and_text_equal_hf(llava_path, cases, expected):
    llm = LLM(llava_path)
    assert _tokens(llm.generate([_mm(p, imgs) for p, imgs in cases], GREEDY, use_tqdm=False)) == expected
    assert expected[0] != expected[3]  # the image matters: same text, different image, different tokens
    cache = llm.engine.runner.encoder_cache
    assert (cache.num_encoder_runs, cache.num_encoded_images) == (1, 4)  # one batched encoder run for the step


def test_chunked_prefill_reuses_encoder_outputs(llava_path, cases, expected):
    # 7-token steps: every image's 16 placeholder tokens span three or four chunks
    llm = LLM(llava_path, max_num_batched_tokens=7, max_num_seqs=2)
    assert _tokens(llm.generate([_mm(p, imgs) for p, imgs in cases], GREEDY, use_tqdm=False)) == expected
    cache = llm.engine.runner.encoder_cache
    assert cache.num_encoded_images == 4 and cache.num_hits >= 4  # each image encoded once, then served cached

    off = LLM(llava_path, max_num_batched_tokens=7, max_num_seqs=2)
    off.engine.runner.encoder_cache.enabled = False  # the same prompts re-encode their images per chunk
    assert _tokens(off.generate([_mm(p, imgs) for p, imgs in cases], GREEDY, use_tqdm=False)) == expected
    assert off.engine.runner.encoder_cache.num_encoded_images > 4 * 2


def test_preemption_recomputes_equal_to_hf(llava_path, cases, expected):
    # 10 blocks of 8 tokens for 4 prompts of 20-45 tokens + 10 outputs each: sequences are preempted
    llm = LLM(llava_path, block_size=8, num_kv_blocks=10, max_num_batched_tokens=16)
    assert _tokens(llm.generate([_mm(p, imgs) for p, imgs in cases], GREEDY, use_tqdm=False)) == expected
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_keys_on_image_content(llava_path, images, hf_vlm_greedy):
    llm = LLM(llava_path, enable_prefix_caching=True, block_size=4)
    first = _tokens(llm.generate(_mm(ONE, [images[0]]), GREEDY, use_tqdm=False))[0]
    hits = llm.stats()["prefix_cache_hits"]
    other = _tokens(llm.generate(_mm(ONE, [images[4]]), GREEDY, use_tqdm=False))[0]
    # same text before the image: only the blocks ending before the first image token are shared
    image_offset = ONE.index("<image>")
    shared = llm.stats()["prefix_cache_hits"] - hits
    assert other == hf_vlm_greedy(llava_path, ONE, [images[4]]) and other != first
    assert 0 < shared <= len(llm.tokenizer.encode(ONE[:image_offset]))
    hits = llm.stats()["prefix_cache_hits"]
    again = _tokens(llm.generate(_mm(ONE, [images[0]]), GREEDY, use_tqdm=False))[0]
    assert again == first and llm.stats()["prefix_cache_hits"] - hits > 16  # the image's blocks too


def test_bad_inputs_are_refused_before_queueing(llava_path, make_checkpoint, images):
    llm = LLM(llava_path, limit_mm_per_prompt={"image": 1})
    with pytest.raises(InvalidRequestError, match="at most 1 image"):
        llm.generate(_mm(TWO, [images[0], images[1]]), GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="2 image placeholder"):
        llm.generate(_mm(ONE + " <image>", [images[0]]), GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="PIL"):
        llm.generate({"prompt": ONE, "multi_modal_data": {"image": b"not an image"}}, GREEDY, use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="prompt text"):
        llm.generate({"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": [images[0]]}}, GREEDY,
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    text_only = LLM(make_checkpoint())
    with pytest.raises(InvalidRequestError, match="text-only"):
        text_only.generate(_mm(ONE, [images[0]]), GREEDY, use_tqdm=False)
