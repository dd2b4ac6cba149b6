"""LLaVA and Qwen2-VL: the first token's top-5 logprobs equal transformers' for prompts with one and
two images, long or wide. Greedy tokens of a tiny random model are too insensitive to the image to
catch every vision-tower bug (see test_qwen2_5_vl.py); the whole next-token distribution is not."""

from __future__ import annotations

import pytest
import torch

from pageant.engine import LLM, SamplingParams
from pageant.engine.multimodal.processor import load_hf_processor
from tests.multimodal import test_llava, test_qwen2_vl

ARCHS = {"llava": ("llava_path", "LlavaForConditionalGeneration", test_llava),
         "qwen2_vl": ("qwen2_vl_path", "Qwen2VLForConditionalGeneration", test_qwen2_vl)}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_first_token_logprobs_equal_hf(request, images, arch):
    import transformers

    fixture, cls, module = ARCHS[arch]
    path = request.getfixturevalue(fixture)
    cases = [(module.ONE, [images[0]]), (module.TWO, [images[3], images[1]]), (module.ONE, [images[4]])]
    hf = getattr(transformers, cls).from_pretrained(path, dtype=torch.float32).eval()
    processor = load_hf_processor(path)
    outs = LLM(path).generate([{"prompt": p, "multi_modal_data": {"image": imgs}} for p, imgs in cases],
                              SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    for (prompt, imgs), out in zip(cases, outs):
        with torch.no_grad():
            logits = hf(**processor(text=[prompt], images=imgs, return_tensors="pt")).logits[0, -1]
        ref = torch.log_softmax(logits.float(), -1)  # [vocab]
        top = out.outputs[0].logprobs[0]
        assert set(top) == set(ref.topk(5).indices.tolist()), (arch, prompt)
        for token, lp in top.items():
            assert abs(lp.logprob - float(ref[token])) < 1e-4, (arch, prompt, token)
