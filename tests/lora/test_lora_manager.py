"""LoRAManager: slots, LRU swaps, CPU cache, running counts, and deltas equal to PEFT's layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pageant.engine.adapters import (
    LoRAAdapterError,
    LoRAManager,
    LoRAModelSpec,
    LoRANotFoundError,
    wrap_model,
)
from pageant.engine.config import ModelConfig

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def manager_for(ckpt, backend="torch", **kw) -> LoRAManager:
    spec = LoRAModelSpec.from_model_config(ModelConfig.from_pretrained(ckpt))
    kw.setdefault("max_loras", 2)
    kw.setdefault("max_lora_rank", 8)
    return LoRAManager(spec, backend=backend, reserved_names=("base-model",), **kw)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, make_adapter):
    return {
        "a": make_adapter(tiny_checkpoint, r=4, alpha=8, targets=ALL, seed=1),
        "b": make_adapter(tiny_checkpoint, r=8, alpha=4, targets=("q_proj", "v_proj", "down_proj"), seed=2),
        "c": make_adapter(tiny_checkpoint, r=2, alpha=2, targets=("k_proj", "up_proj"), seed=3, use_rslora=True),
    }


def peft_projection(adapter_path: str, base: str, layer: int, parent: str, proj: str):
    """PEFT's own LoRA layer (base + lora_B(lora_A(x)) * scaling) from the saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter_path)
    return getattr(getattr(model.base_model.model.model.layers[layer], parent), proj)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_delta_equals_peft_layers(tiny_checkpoint, adapters, backend):
    """Mixed tokens (a, base, b) through a fused qkv and a down projection equal PEFT's layers."""
    mgr = manager_for(tiny_checkpoint, backend)
    for name, path in adapters.items():
        mgr.add_lora(name, ord(name), path)
    names, counts = ["a", None, "b", "a"], [3, 2, 4, 1]
    mgr.set_batch(names, counts)
    token_names = [n for n, c in zip(names, counts) for _ in range(c)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(token_names), 64, generator=gen)
    layer = 1
    # fused qkv: base weight = cat of PEFT's base q, k, v weights
    peft = {n: {p: peft_projection(adapters[n], tiny_checkpoint, layer, "self_attn", p)
                for p in ("q_proj", "k_proj", "v_proj")} for n in ("a", "b")}
    w = torch.cat([peft["a"][p].base_layer.weight for p in ("q_proj", "k_proj", "v_proj")])
    out = mgr.apply(layer, "qkv_proj", x, x @ w.T)
    for t, n in enumerate(token_names):
        if n is None:
            want = x[t] @ w.T
        else:
            want = torch.cat([peft[n][p](x[t : t + 1])[0] for p in ("q_proj", "k_proj", "v_proj")])
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)
    # the adapter changes outputs
    assert not torch.allclose(out[0], x[0] @ w.T, atol=1e-3)
    # down_proj (in 128 -> out 64)
    xd = torch.randn(len(token_names), 128, generator=gen)
    downs = {n: peft_projection(adapters[n], tiny_checkpoint, layer, "mlp", "down_proj") for n in ("a", "b")}
    wd = downs["a"].base_layer.weight
    out = mgr.apply(layer, "down_proj", xd, xd @ wd.T)
    for t, n in enumerate(token_names):
        want = xd[t] @ wd.T if n is None else downs[n](xd[t : t + 1])[0]
        torch.testing.assert_close(out[t], want, atol=1e-5, rtol=1e-5)


def test_lru_slots_and_batch_cap(tiny_checkpoint, adapters):
    mgr = manager_for(tiny_checkpoint, max_loras=2, max_cpu_loras=3)
    for i, (name, path) in enumerate(adapters.items()):
        assert mgr.add_lora(name, i + 1, path) is True
    assert mgr.add_lora("a", 1, adapters["a"]) is False  # same adapter again: no-op
    mgr.set_batch(["a", "b"], [1, 1])
    assert sorted(mgr.resident()) == ["a", "b"] and mgr.num_swaps_in == 2
    mgr.set_batch(["b", None], [1, 1])  # b becomes most recent
    mgr.set_batch(["c"], [2])  # evicts a (least recently used)
    assert sorted(mgr.resident()) == ["b", "c"] and mgr.num_swaps_in == 3
    batch = mgr.set_batch(["a", "c"], [1, 2])  # c is in the batch: b is evicted, not c
    assert sorted(mgr.resident()) == ["a", "c"] and mgr.num_swaps_in == 4
    slot_a, slot_c = batch.token_lora_indices.tolist()[0], batch.token_lora_indices.tolist()[1]
    assert mgr._slot_names[slot_a] == "a" and mgr._slot_names[slot_c] == "c"
    with pytest.raises(ValueError, match="more than max_loras=2"):
        mgr.set_batch(["a", "b", "c"], [1, 1, 1])
    assert not mgr.set_batch([None, None], [3, 1]).has_lora


def test_cpu_cache_evicts_and_reloads(tiny_checkpoint, adapters):
    mgr = manager_for(tiny_checkpoint, max_loras=1, max_cpu_loras=2)
    for i, (name, path) in enumerate(adapters.items()):
        mgr.add_lora(name, i + 1, path)
    assert mgr.cpu_cached() == ["b", "c"]
    assert [n for n, _, _ in mgr.list_loras()] == ["a", "b", "c"]  # still registered
    mgr.set_batch(["a"], [1])  # read from disk again
    assert mgr.resident() == ["a"] and mgr.cpu_cached() == ["c", "a"]
    x = torch.randn(1, 64)
    assert not torch.equal(mgr.apply(0, "o_proj", x, torch.zeros(1, 64)), torch.zeros(1, 64))


def test_running_refcounts_and_remove(tiny_checkpoint, adapters):
    mgr = manager_for(tiny_checkpoint)
    mgr.add_lora("a", 1, adapters["a"])
    mgr.acquire("a")
    mgr.acquire("a")
    assert mgr.num_running("a") == 2
    with pytest.raises(LoRAAdapterError, match="2 unfinished request"):
        mgr.remove_lora("a")
    mgr.release("a")
    mgr.release("a")
    assert mgr.num_running("a") == 0
    mgr.set_batch(["a"], [1])
    mgr.remove_lora("a")
    assert mgr.list_loras() == [] and mgr.resident() == []
    with pytest.raises(LoRANotFoundError):
        mgr.remove_lora("a")
    with pytest.raises(LoRANotFoundError):
        mgr.acquire("a")
    mgr.add_lora("a", 1, adapters["b"])  # the name is free again


def test_names_and_ids(tiny_checkpoint, adapters):
    mgr = manager_for(tiny_checkpoint)
    with pytest.raises(LoRAAdapterError, match="collides with the base model"):
        mgr.add_lora("base-model", 1, adapters["a"])
    for bad in ("", "a b", "x\n"):
        with pytest.raises(LoRAAdapterError, match="invalid LoRA name"):
            mgr.add_lora(bad, 1, adapters["a"])
    with pytest.raises(LoRAAdapterError, match="positive integer"):
        mgr.add_lora("a", 0, adapters["a"])
    mgr.add_lora("a", 1, adapters["a"])
    with pytest.raises(LoRAAdapterError, match="already loaded from another path"):
        mgr.add_lora("a", 1, adapters["b"])
    with pytest.raises(LoRAAdapterError, match="already used by adapter 'a'"):
        mgr.add_lora("b", 1, adapters["b"])
    with pytest.raises(LoRAAdapterError, match="max_lora_rank=2"):
        manager_for(tiny_checkpoint, max_lora_rank=2).add_lora("b", 2, adapters["b"])
    with pytest.raises(ValueError, match="max_cpu_loras"):
        manager_for(tiny_checkpoint, max_loras=3, max_cpu_loras=2)


def test_wrap_model_adds_delta(tiny_checkpoint, adapters):
    """A stand-in layer tree with the engine model's attribute names gets wrapped projections."""
    mgr = manager_for(tiny_checkpoint)
    mgr.add_lora("a", 1, adapters["a"])

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.qkv_proj, self.self_attn.o_proj = nn.Linear(64, 128), nn.Linear(64, 64)
            self.mlp = nn.Module()
            self.mlp.gate_up_proj, self.mlp.down_proj = nn.Linear(64, 256), nn.Linear(128, 64)

    class Model(nn.Module):
        def decoder_layers(self):
            return self.model.layers

    model = Model()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([Layer(), Layer()])
    wrap_model(model, mgr)
    wrap_model(model, mgr)  # idempotent
    proj = model.model.layers[1].mlp.gate_up_proj
    assert type(proj).__name__ == "LoRALinear" and proj.layer == 1
    x = torch.randn(3, 64)
    base = proj.base_layer(x)
    mgr.set_batch([None, "a"], [1, 2])
    out = proj(x)
    torch.testing.assert_close(out[0], base[0])
    assert not torch.allclose(out[1:], base[1:], atol=1e-3)
    mgr.clear_batch()
    torch.testing.assert_close(proj(x), base)
