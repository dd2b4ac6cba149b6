"""Quantized checkpoints under tensor parallelism: each rank loads its shard of the packed weights
(group boundaries respected) and greedy outputs equal Hugging Face's loading of the same
checkpoint (compressed-tensors, float32 CPU), at TP=2 and with a LoRA adapter on the quantized base."""

from __future__ import annotations

import pytest

pytest.importorskip("compressed_tensors")

from pageant.engine import LLM, LoRARequest  # noqa: E402
from pageant.engine.layers.quantization.checkpoints import compressed_tensors_checkpoint, gptq_checkpoint  # noqa: E402
from tests.engine.quant_helpers import generate, hf_greedy, random_prompts  # noqa: E402

SCHEMES = {
    "int4-g32-asym": dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    "int8-channel": dict(num_bits=8, type="int", strategy="channel", symmetric=True),
    "fp8-channel": dict(num_bits=8, type="float", strategy="channel", symmetric=True),
}


def prompts(n: int = 6, seed: int = 5) -> list[list[int]]:
    return random_prompts(n, seed, lengths=(2, 30))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_quantized_checkpoint_tensor_parallel(make_checkpoint, tmp_path, scheme):
    path = compressed_tensors_checkpoint(make_checkpoint("llama"), tmp_path / scheme, SCHEMES[scheme])
    ps = prompts()
    with LLM(model=path, tensor_parallel_size=2, block_size=8) as llm:
        assert generate(llm, ps) == hf_greedy(path, ps, dequantize=True)


def test_gptq_tensor_parallel_equals_one_rank(make_checkpoint, tmp_path):
    """GPTQ (which transformers cannot load here): TP=2 equals the one-rank engine, itself tested
    against the dequantized reference elsewhere."""
    path = gptq_checkpoint(make_checkpoint("llama"), tmp_path / "gptq", group_size=32)
    ps = prompts(seed=6)
    expected = generate(LLM(model=path), ps)
    with LLM(model=path, tensor_parallel_size=2) as llm:
        assert generate(llm, ps) == expected


def test_lora_on_quantized_base_tensor_parallel(make_checkpoint, make_adapter, tmp_path):
    dense = make_checkpoint("llama")
    path = compressed_tensors_checkpoint(dense, tmp_path / "int4", SCHEMES["int4-g32-asym"])
    adapter = make_adapter(dense, r=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"), seed=9)
    ps = prompts(seed=7)
    expected = {None: hf_greedy(path, ps, dequantize=True), "a": hf_greedy(path, ps, dequantize=True, adapter=adapter)}
    order = ["a", None, "a", None, "a", "a"]
    with LLM(model=path, tensor_parallel_size=2, enable_lora=True, max_lora_rank=4, enable_prefix_caching=True,
             block_size=4) as llm:
        req = LoRARequest("a", 1, adapter)
        outs = generate(llm, ps, lora_request=[req if n else None for n in order])
        for i, (out, name) in enumerate(zip(outs, order)):
            assert out == expected[name][i], f"prompt {i} with adapter {name}"
