"""Quantized checkpoints under tensor parallelism: each rank loads its shard of the packed weights
(group boundaries respected) and greedy outputs equal Hugging Face's loading of the same
checkpoint (compressed-tensors, float32 CPU), at TP=2 and with a LoRA adapter on the quantized base."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("compressed_tensors")

from pageant.engine import LLM, LoRARequest, SamplingParams  # noqa: E402
from pageant.engine.layers.quantization.checkpoints import compressed_tensors_checkpoint, gptq_checkpoint  # noqa: E402

MAX_NEW = 8
SP = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
SCHEMES = {
    "int4-g32-asym": dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    "int8-channel": dict(num_bits=8, type="int", strategy="channel", symmetric=True),
    "fp8-channel": dict(num_bits=8, type="float", strategy="channel", symmetric=True),
}


def hf_greedy(path: str, prompts, adapter: str | None = None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                        do_sample=False, min_new_tokens=MAX_NEW, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def prompts(n: int = 6, seed: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 30))] for _ in range(n)]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_quantized_checkpoint_tensor_parallel(make_checkpoint, tmp_path, scheme):
    path = compressed_tensors_checkpoint(make_checkpoint("llama"), tmp_path / scheme, SCHEMES[scheme])
    ps = prompts()
    with LLM(model=path, tensor_parallel_size=2, block_size=8) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], SP, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, ps)


def test_gptq_tensor_parallel_equals_one_rank(make_checkpoint, tmp_path):
    """GPTQ (which transformers cannot load here): TP=2 equals the one-rank engine, itself tested
    against the dequantized reference elsewhere."""
    path = gptq_checkpoint(make_checkpoint("llama"), tmp_path / "gptq", group_size=32)
    ps = prompts(seed=6)
    expected = [o.outputs[0].token_ids for o in LLM(model=path).generate([{"prompt_token_ids": p} for p in ps], SP,
                                                                         use_tqdm=False)]
    with LLM(model=path, tensor_parallel_size=2) as llm:
        assert [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in ps], SP,
                                                              use_tqdm=False)] == expected


def test_lora_on_quantized_base_tensor_parallel(make_checkpoint, make_adapter, tmp_path):
    dense = make_checkpoint("llama")
    path = compressed_tensors_checkpoint(dense, tmp_path / "int4", SCHEMES["int4-g32-asym"])
    adapter = make_adapter(dense, r=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"), seed=9)
    ps = prompts(seed=7)
    expected = {None: hf_greedy(path, ps), "a": hf_greedy(path, ps, adapter)}
    order = ["a", None, "a", None, "a", "a"]
    with LLM(model=path, tensor_parallel_size=2, enable_lora=True, max_lora_rank=4, enable_prefix_caching=True,
             block_size=4) as llm:
        req = LoRARequest("a", 1, adapter)
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], SP,
                            lora_request=[req if n else None for n in order], use_tqdm=False)
        for i, (out, name) in enumerate(zip(outs, order)):
            assert out.outputs[0].token_ids == expected[name][i], f"prompt {i} with adapter {name}"
