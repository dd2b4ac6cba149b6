"""LoRA on a quantized base (QLoRA-style serving, issue 13): a compressed-tensors int4 group-32
checkpoint made by the compressed-tensors library, a PEFT adapter on all seven projections, a
mixed batch (with and without the adapter) with prefix caching on. The reference is Hugging Face:
the same checkpoint dequantized by transformers' compressed-tensors integration, with the PEFT
adapter merged into it (float32 CPU)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("compressed_tensors")
pytest.importorskip("peft")

from pageant.engine import LLM, LoRARequest  # noqa: E402
from pageant.engine.layers.quantization.checkpoints import compressed_tensors_checkpoint  # noqa: E402
from tests.engine.quant_helpers import generate, hf_greedy  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_lora_on_int4_base_mixed_batch_with_prefix_caching(make_checkpoint, make_adapter, tmp_path):
    dense = make_checkpoint("llama")
    path = compressed_tensors_checkpoint(dense, tmp_path / "int4",
                                         dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False))
    adapter = make_adapter(dense, r=4, alpha=8, targets=ALL, seed=7)  # PEFT names are the float model's
    rng = random.Random(3)
    shared = [1] + [rng.randrange(3, 500) for _ in range(19)]  # a 20-token prefix, 5 full blocks of 4
    prompts = [shared + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    expected = {None: hf_greedy(path, prompts, dequantize=True),
                "a": hf_greedy(path, prompts, dequantize=True, adapter=adapter)}
    assert expected["a"] != expected[None]  # the adapter matters

    llm = LLM(model=path, enable_lora=True, max_loras=1, max_lora_rank=4, enable_prefix_caching=True, block_size=4,
              max_num_seqs=8)
    qkv = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.base_layer.weight_packed.dtype == torch.int32  # LoRA wraps the packed layer
    req = LoRARequest("a", 1, adapter)
    order = ["a", None, "a", None, None, "a"]
    for round_ in range(2):  # the second round reads the shared blocks from the prefix cache
        outs = generate(llm, prompts, lora_request=[req if o else None for o in order])
        for i, (out, o) in enumerate(zip(outs, order)):
            assert out == expected[o][i], f"round {round_}, prompt {i}, adapter {o}"
        order = order[::-1]
    assert llm.stats()["prefix_cache_hits"] > 0
