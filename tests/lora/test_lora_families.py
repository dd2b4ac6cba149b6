"""LoRA on the new families' attention and MLP projections (PEFT's target names for each family)
equals PEFT ``merge_and_unload`` token for token, in mixed batches with the base model, for fused
checkpoint projections (GPT-NeoX/Falcon ``query_key_value`` whose rows the engine re-lays, Phi-3's
``qkv_proj``/``gate_up_proj``) and for Mixtral's attention next to its experts."""

from __future__ import annotations

import random

import pytest

from pageant.engine import LLM, LoRARequest, SamplingParams
from pageant.engine.adapters import LoRAAdapterError

MAX_NEW = 8
SP = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
NEOX = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
TARGETS = {
    "gpt_neox": (NEOX, ("query_key_value",)),
    "falcon": (NEOX, ("query_key_value", "dense_4h_to_h")),
    "falcon7b": (NEOX, ("query_key_value",)),
    "gemma2": (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), ("k_proj", "up_proj")),
    "phi3": (("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("qkv_proj",)),
    "mixtral": (("q_proj", "k_proj", "v_proj", "o_proj"), ("v_proj",)),
}


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_family_lora_matches_peft(make_checkpoint, make_adapter, hf_greedy, arch):
    base = make_checkpoint(arch)
    full, partial = TARGETS[arch]
    adapters = {"full": make_adapter(base, r=4, alpha=8, targets=full, seed=21),
                "part": make_adapter(base, r=2, alpha=4, targets=partial, seed=22, use_rslora=True)}
    ps = prompts(6, 3)
    expected = {name: hf_greedy(base, ps, MAX_NEW, path) for name, path in adapters.items()}
    expected[None] = hf_greedy(base, ps, MAX_NEW)
    assert expected["full"] != expected[None] and expected["part"] != expected[None]

    llm = LLM(model=base, enable_lora=True, max_loras=2, max_lora_rank=4, block_size=8)
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    order = ["full", None, "part", "full", "part", None]
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SP,
                        lora_request=[None if n is None else requests[n] for n in order], use_tqdm=False)
    for i, (out, name) in enumerate(zip(outs, order)):
        assert out.outputs[0].token_ids == expected[name][i], f"{arch}: prompt {i} with adapter {name}"
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_family_refuses_other_families_targets(make_checkpoint, make_adapter):
    """A Llama-named adapter does not fit GPT-NeoX: refused with the family's own projection names."""
    llama_adapter = make_adapter(make_checkpoint("llama"), r=2, targets=("q_proj",), seed=5)
    llm = LLM(model=make_checkpoint("gpt_neox"), enable_lora=True, max_lora_rank=4)
    with pytest.raises(LoRAAdapterError, match="query_key_value"):
        llm.engine.add_lora(LoRARequest("x", 1, llama_adapter))
