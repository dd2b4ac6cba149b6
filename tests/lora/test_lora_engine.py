"""Multi-LoRA in the engine: greedy outputs of mixed batches (base model + several adapters in one
``generate`` call) equal Hugging Face with each adapter merged through PEFT (float32, CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from pageant.engine import LLM, InvalidRequestError, LoRARequest, SamplingParams
from pageant.engine.adapters import LoRAAdapterError

MAX_NEW = 10
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SP = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def setup(make_checkpoint, make_adapter, hf_greedy):
    """A llama base, three adapters (different ranks, targets, scalings) and HF's expected outputs."""
    base = make_checkpoint("llama")
    adapters = {
        "all": make_adapter(base, r=4, alpha=8, targets=ALL, seed=11),
        "qv": make_adapter(base, r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=12),
        "rs": make_adapter(base, r=2, alpha=4, targets=("k_proj", "o_proj", "up_proj"), seed=13, use_rslora=True),
    }
    ps = prompts(8, 0)
    expected = {None: hf_greedy(base, ps, MAX_NEW, None)}
    expected.update({name: hf_greedy(base, ps, MAX_NEW, path) for name, path in adapters.items()})
    for name in adapters:  # every adapter changes the greedy outputs
        assert expected[name] != expected[None]
    requests = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
    return base, adapters, requests, ps, expected


def run_mixed(llm: LLM, requests, ps, expected, order):
    loras = [None if name is None else requests[name] for name in order]
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SP, lora_request=loras, use_tqdm=False)
    for i, (out, name) in enumerate(zip(outs, order)):
        assert out.outputs[0].token_ids == expected[name][i], f"prompt {i} with adapter {name}"


def test_mixed_batch_matches_peft_merged(setup):
    base, _, requests, ps, expected = setup
    llm = LLM(model=base, enable_lora=True, max_loras=3, max_lora_rank=8)
    order = [None, "all", "qv", "all", None, "qv", "rs", "all"]
    run_mixed(llm, requests, ps, expected, order)
    stats = llm.stats()
    assert stats["max_lora"] == 3 and stats["running_lora_adapters"] == [] == stats["waiting_lora_adapters"]
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    assert [r.lora_name for r in llm.engine.list_loras()] == ["all", "qv", "rs"]
    assert all(llm.engine.num_lora_requests(n) == 0 for n in requests)
    # one adapter for every prompt
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], SP, lora_request=requests["rs"], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected["rs"]


def test_more_adapters_than_slots_swap_lru(setup):
    """max_loras=1, max_cpu_loras=2: three adapters and the base model in flight at once still
    complete correctly (batches hold one adapter; slots and the CPU cache swap LRU), with chunked
    prefill and a small pool that forces preemption."""
    base, _, requests, ps, expected = setup
    llm = LLM(model=base, enable_lora=True, max_loras=1, max_lora_rank=8, max_cpu_loras=2,
              max_num_batched_tokens=24, num_kv_blocks=16, block_size=4)
    order = ["all", "qv", None, "rs", "qv", "all", "rs", None]
    run_mixed(llm, requests, ps, expected, order)
    assert llm.engine.lora_manager.num_swaps_in >= 3
    assert len(llm.engine.lora_manager.cpu_cached()) <= 2


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_other_architectures(make_checkpoint, make_adapter, hf_greedy, arch):
    """qkv bias + tied embeddings (qwen2), q/k norm and head_dim != hidden/heads (qwen3)."""
    base = make_checkpoint(arch)
    path = make_adapter(base, r=4, alpha=8, targets=ALL, seed=21)
    ps = prompts(3, 1)
    want_lora, want_base = hf_greedy(base, ps, MAX_NEW, path), hf_greedy(base, ps, MAX_NEW, None)
    llm = LLM(model=base, enable_lora=True, max_loras=1, max_lora_rank=4)
    req = LoRARequest("a", 1, path)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps * 2], SP, lora_request=[req] * 3 + [None] * 3,
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want_lora + want_base


def test_triton_backend_in_interpreter(setup):
    """The Triton path (attention and LoRA kernels, TRITON_INTERPRET=1) gives the same tokens."""
    base, _, requests, ps, expected = setup
    llm = LLM(model=base, enable_lora=True, max_loras=2, max_lora_rank=8, attention_backend="triton")
    order = ["qv", None, "all"]
    run_mixed(llm, requests, ps[:3], {k: v[:3] for k, v in expected.items()}, order)


def test_bad_adapters_refused(setup, make_adapter, adapter_root, tmp_path):
    base, adapters, requests, ps, _ = setup
    llm = LLM(model=base, enable_lora=True, max_loras=2, max_lora_rank=4, allowed_lora_root=str(adapter_root))
    engine = llm.engine
    inside = make_adapter(base, r=4, alpha=8, targets=("q_proj",), seed=5, root=adapter_root)
    p = {"prompt_token_ids": ps[0]}
    cases = {
        "outside the allowed adapter root": LoRARequest("x", 9, adapters["all"]),
        "does not exist": LoRARequest("x", 9, str(adapter_root / "missing")),
        "collides with the base model": LoRARequest(engine.model_name, 9, inside),
    }
    for message, req in cases.items():
        with pytest.raises(InvalidRequestError, match=message):
            engine.add_request("r1", p, SP, lora_request=req)
        with pytest.raises(LoRAAdapterError, match=message):
            engine.add_lora(req)
    big = make_adapter(base, r=8, alpha=8, targets=("q_proj",), seed=6, root=adapter_root)
    with pytest.raises(InvalidRequestError, match="max_lora_rank=4"):
        llm.generate([p], SP, lora_request=LoRARequest("big", 3, big), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="LoRA requests for 1 prompts"):
        llm.generate([p], SP, lora_request=[None, None], use_tqdm=False)
    assert not engine.has_unfinished_requests() and engine.list_loras() == []
    # a good adapter still works after all of that; unloading is refused while it is in use
    assert engine.add_lora(LoRARequest("ok", 1, inside)) is True
    assert engine.add_lora(LoRARequest("ok", 1, inside)) is False
    engine.add_request("r2", p, SP, lora_request=LoRARequest("ok", 1, inside))
    assert engine.num_lora_requests("ok") == 1
    assert engine.stats()["waiting_lora_adapters"] == ["ok"]
    with pytest.raises(LoRAAdapterError, match="unfinished request"):
        engine.remove_lora("ok")
    engine.step()
    assert engine.stats()["running_lora_adapters"] == ["ok"]
    engine.abort_request("r2")
    assert engine.num_lora_requests("ok") == 0
    assert engine.remove_lora(1) is True and engine.remove_lora("ok") is False
    # LoRA disabled: a clear 400-style error
    plain = LLM(model=base)
    with pytest.raises(InvalidRequestError, match="not enabled"):
        plain.generate([p], SP, lora_request=requests["all"], use_tqdm=False)
    assert plain.stats()["max_lora"] == 0


def test_scheduler_caps_distinct_adapters_per_batch(setup):
    """With max_loras=2, a request for a third adapter waits while two are running, and requests
    queued behind it (base model, running adapters) are not held up by it."""
    base, _, requests, ps, expected = setup
    engine = LLM(model=base, enable_lora=True, max_loras=2, max_lora_rank=8).engine
    order = ["all", "qv", "rs", None, "all"]
    for i, name in enumerate(order):
        engine.add_request(f"r{i}", {"prompt_token_ids": ps[i]}, SP,
                           lora_request=None if name is None else requests[name])
    engine.step()
    running = {s.request_id for s in engine.scheduler.running}
    assert running == {"r0", "r1", "r3", "r4"}  # r2 ("rs") skipped, r3 and r4 went ahead of it
    assert engine.stats()["running_lora_adapters"] == ["all", "qv"]
    assert engine.stats()["waiting_lora_adapters"] == ["rs"]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        assert len({s.request.lora_name for s in engine.scheduler.running} - {None}) <= 2
    assert [done[f"r{i}"] for i in range(len(order))] == [expected[n][i] for i, n in enumerate(order)]


def test_bfloat16_engine_with_adapters(setup):
    """bfloat16 weights and LoRA buffers: a mixed batch runs and each adapter changes the outputs.
    (bf16 results may depend on the batch's shape, so only the first token is compared across
    batches: it comes from the same prompt under the same adapter.)"""
    base, _, requests, ps, _ = setup
    llm = LLM(model=base, dtype="bfloat16", enable_lora=True, max_loras=2, max_lora_rank=8)
    assert llm.engine.lora_manager.lora_a["qkv_proj"].dtype == torch.bfloat16
    p = [{"prompt_token_ids": x} for x in ps[:4]]
    mixed = llm.generate(p, SP, lora_request=[None, requests["all"], requests["qv"], requests["all"]], use_tqdm=False)
    base_only = llm.generate(p, SP, use_tqdm=False)
    alone = llm.generate(p[1:2], SP, lora_request=requests["all"], use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == MAX_NEW for o in mixed + base_only + alone)
    assert mixed[0].outputs[0].token_ids[0] == base_only[0].outputs[0].token_ids[0]
    assert mixed[1].outputs[0].token_ids[0] == alone[0].outputs[0].token_ids[0]
    assert all(mixed[i].outputs[0].token_ids != base_only[i].outputs[0].token_ids for i in (1, 2, 3))
    chat = llm.chat([{"role": "user", "content": "hello"}], SP, lora_request=requests["qv"], use_tqdm=False)
    assert len(chat[0].outputs[0].token_ids) == MAX_NEW


def test_prefix_caching_keeps_adapters_apart(setup):
    """The same prompt under different adapters must never share cached KV blocks (the KV of a
    prompt depends on the adapter): with prefix caching on, every adapter still matches PEFT."""
    base, _, requests, ps, expected = setup
    llm = LLM(model=base, enable_lora=True, max_loras=3, max_lora_rank=8, enable_prefix_caching=True, block_size=4)
    prompt = [{"prompt_token_ids": ps[0]}]
    for name in ["all", None, "qv", "all", "rs", None]:  # one after another: blocks are cached by then
        out = llm.generate(prompt, SP, lora_request=None if name is None else requests[name], use_tqdm=False)
        assert out[0].outputs[0].token_ids == expected[name][0], name
    names = [None, "all", "qv", "rs"]
    outs = llm.generate(prompt * 4, SP, lora_request=[None if n is None else requests[n] for n in names],
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [expected[n][0] for n in names]
