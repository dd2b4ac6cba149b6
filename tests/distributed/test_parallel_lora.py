"""LoRA under tensor and pipeline parallelism equals PEFT ``merge_and_unload`` token for token: each
rank holds its share of every adapter (column-parallel B rows, row-parallel A columns added before
the all-reduce), adapters swap through the slots the same way on every rank, and adapters loaded
and unloaded while the engine runs reach every rank."""

from __future__ import annotations

import random

import pytest

from pageant.engine import LLM, LoRARequest, SamplingParams

MAX_NEW = 8
SP = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = {  # arch: (parallel sizes, adapter targets)
    "llama": ((2, 1), LLAMA),
    "phi3": ((2, 1), ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),  # one slice over a fused layer
    "falcon7b": ((2, 1), ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),  # replicated KV head
    "qwen2": ((1, 2), LLAMA),  # pipeline stages: each applies its own layers' adapters
}


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


@pytest.mark.parametrize("arch", sorted(CASES))
def test_parallel_lora_matches_peft(make_checkpoint, make_adapter, hf_greedy, arch):
    (tp, pp), targets = CASES[arch]
    base = make_checkpoint(arch)
    paths = {"a": make_adapter(base, r=4, alpha=8, targets=targets, seed=31),
             "b": make_adapter(base, r=2, alpha=4, targets=targets[:2], seed=32),
             "c": make_adapter(base, r=4, alpha=4, targets=targets[-2:], seed=33)}
    ps = prompts(6, 4)
    expected = {name: hf_greedy(base, ps, MAX_NEW, path) for name, path in paths.items()}
    expected[None] = hf_greedy(base, ps, MAX_NEW)
    with LLM(model=base, tensor_parallel_size=tp, pipeline_parallel_size=pp, enable_lora=True, max_loras=2,
             max_lora_rank=4, block_size=8, enable_prefix_caching=True) as llm:
        requests = {name: LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(paths.items())}
        order = ["a", None, "b", "a", "b", None]
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], SP,
                            lora_request=[None if n is None else requests[n] for n in order], use_tqdm=False)
        for i, (out, name) in enumerate(zip(outs, order)):
            assert out.outputs[0].token_ids == expected[name][i], f"{arch}: prompt {i} with adapter {name}"
        # a third adapter while two are resident: slots swap (LRU) identically on every rank
        outs = llm.generate([{"prompt_token_ids": p} for p in ps[:3]], SP,
                            lora_request=[requests["c"], requests["a"], requests["c"]], use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [expected["c"][0], expected["a"][1], expected["c"][2]]
        assert llm.engine.remove_lora("b")  # unloaded on every rank; loading it again reads it back
        outs = llm.generate([{"prompt_token_ids": ps[2]}], SP, lora_request=requests["b"], use_tqdm=False)
        assert outs[0].outputs[0].token_ids == expected["b"][2]
