"""Qwen2.5-VL (window-attention vision transformer, Qwen2 with M-RoPE) against transformers: the
window order, the M-RoPE positions, the image features, the first-token logprobs, and Hugging
Face's greedy tokens for one and two images of different sizes batched with text, whole and
under chunked prefill (cutting inside the image tokens) with prefix caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pageant.engine import LLM, SamplingParams
from pageant.engine.models.qwen2_5_vl import window_index
from pageant.engine.multimodal.processor import load_hf_processor
from tests.multimodal.test_qwen2_vl import ONE, TWO, _run


@pytest.fixture(scope="module")
def qwen2_5_vl_path(tmp_path_factory) -> str:
    from pageant.engine.multimodal.testing import build_qwen2_5_vl_checkpoint

    return str(build_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("qwen25vl"), max_pixels=112 * 112))


@pytest.fixture(scope="module")
def wide():
    """100x130 pixels -> 84x112 (6x8 patches, 3x4 merged tokens): 2x2-token windows, cut at the bottom."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 130, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def cases(images, wide):
    return [(ONE, [wide]), (TWO, [images[1], wide]), ("Plain text, no image", []), (ONE, [images[2]])]


@pytest.fixture(scope="module")
def expected(qwen2_5_vl_path, hf_vlm_greedy, cases):
    return [hf_vlm_greedy(qwen2_5_vl_path, p, imgs) for p, imgs in cases]


@pytest.mark.parametrize("grid", [[[1, 6, 8]], [[1, 4, 4], [1, 10, 6]], [[2, 6, 10]]])
def test_window_index_matches_transformers(grid):
    from transformers.vision_utils import get_vision_window_index

    order, lengths = window_index(grid, 2, 2)
    ref_order, ref_cu = get_vision_window_index(torch.tensor(grid), spatial_merge_size=2, window_size=56, patch_size=14)
    assert torch.equal(order, ref_order) and not torch.equal(order, torch.sort(order).values)
    assert [0, *np.cumsum(lengths).tolist()] == ref_cu.tolist()


def test_mrope_positions_match_transformers(qwen2_5_vl_path, cases):
    import transformers

    prompt, imgs = cases[1]
    mm = LLM(qwen2_5_vl_path).engine.mm_processor.process(prompt, imgs)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_path, dtype=torch.float32)
    inputs = load_hf_processor(qwen2_5_vl_path)(text=[prompt], images=imgs, return_tensors="pt")
    positions, delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               inputs["image_grid_thw"])
    assert np.array_equal(mm.mrope_positions, positions[:, 0].numpy()) and mm.mrope_delta == int(delta)
    assert mm.mrope_delta != 0 and inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 6, 8]]


def test_images_and_text_equal_hf(qwen2_5_vl_path, cases, expected):
    llm = LLM(qwen2_5_vl_path)
    assert type(llm.engine.runner.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert _run(llm, cases) == expected
    assert expected[0] != expected[3]


def test_first_token_logprobs_equal_hf(qwen2_5_vl_path, cases):
    """The whole prompt (image features at M-RoPE positions) gives transformers' next-token distribution."""
    import transformers

    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_path, dtype=torch.float32)
    processor = load_hf_processor(qwen2_5_vl_path)
    prompts = [{"prompt": p, "multi_modal_data": {"image": imgs}} if imgs else p for p, imgs in cases]
    outs = LLM(qwen2_5_vl_path).generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=5),
                                          use_tqdm=False)
    for (prompt, imgs), out in zip(cases, outs):
        with torch.no_grad():
            logits = hf(**processor(text=[prompt], images=imgs or None, return_tensors="pt")).logits[0, -1]
        ref = torch.log_softmax(logits.float(), -1)  # [vocab]
        top = out.outputs[0].logprobs[0]
        assert set(top) == set(ref.topk(5).indices.tolist())
        for token, lp in top.items():
            assert abs(lp.logprob - float(ref[token])) < 1e-4, (prompt, token)


def test_chunked_prefill_with_prefix_caching_equal_hf(qwen2_5_vl_path, cases, expected):
    llm = LLM(qwen2_5_vl_path, max_num_batched_tokens=5, max_num_seqs=2, enable_prefix_caching=True, block_size=4)
    assert _run(llm, cases) == expected
    cache = llm.engine.runner.encoder_cache
    assert cache.num_encoded_images == 3 and cache.num_hits > 0  # the wide image twice: encoded once
    assert _run(llm, cases[:1]) == expected[:1] and llm.stats()["prefix_cache_hits"] > 0  # same image: cached KV


def test_image_features_equal_hf(qwen2_5_vl_path, cases):
    """The vision transformer's merged tokens (window order undone) equal transformers' image features."""
    import transformers

    prompt, imgs = cases[1]
    llm = LLM(qwen2_5_vl_path)
    mm = llm.engine.mm_processor.process(prompt, imgs)
    with torch.no_grad():
        mine = torch.cat(llm.engine.runner.model.encode_images([it.data for it in mm.items]))  # [tokens, hidden]
        hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen2_5_vl_path, dtype=torch.float32)
        inputs = load_hf_processor(qwen2_5_vl_path)(text=[prompt], images=imgs, return_tensors="pt")
        ref = torch.cat(hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    assert mine.shape == ref.shape == (4 + 12, 64)
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
