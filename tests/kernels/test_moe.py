"""Fused MoE: the PyTorch reference vs a naive per-token loop and vs transformers' Mixtral block,
the Triton grouped GEMM (interpreter) vs the reference, and the ``FusedMoE`` layer's loaders."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralForCausalLM,
    MixtralSparseMoeBlock,
    MixtralTopKRouter,
)

from pageant.engine.layers.moe import FusedMoE
from pageant.engine.layers.parallel import ParallelState
from pageant.kernels import get_ops, moe, moe_reference, reference, triton_ops

# (num_tokens, num_experts, top_k, hidden, intermediate): one token, tokens > experts, many experts
# for few pairs, top_k 1 with 64-row blocks, several blocks per expert; none of hidden/inter a power of 2
SHAPES = [
    (1, 4, 2, 32, 48),
    (37, 8, 2, 40, 24),
    (5, 16, 4, 24, 20),
    (70, 3, 1, 24, 40),
    (130, 4, 2, 48, 20),
]
DTYPES = [torch.float32, torch.bfloat16]
ACTS = ["silu", "gelu"]


def _problem(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0):
    """Random inputs whose routing never picks the last expert (an expert with no tokens)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if num_experts > top_k:
        logits[:, -1] = -1e9
    weights, ids = moe_reference.select_experts(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def _naive(x, w13, w2, weights, ids, activation):
    """Token by token, slot by slot, in float32."""
    act = moe_reference.activation_fn(activation)
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = w13[e].float() @ x[t].float()  # [2I]
            h = act(gate_up[:inter]) * gate_up[inter:]  # [I]
            out[t] += weights[t, j].float() * (w2[e].float() @ h)
    return out.to(x.dtype)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_matches_naive_loop(shape, dtype, activation, assert_close):
    x, w13, w2, weights, ids = _problem(*shape, dtype)
    assert int(ids.max()) < shape[1] - 1  # the last expert gets no token
    out = moe_reference.fused_moe(x, w13, w2, weights, ids, activation)
    assert_close(out, _naive(x, w13, w2, weights, ids, activation))


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(shape, dtype, activation, assert_close):
    """bfloat16 is compared with the reference's float32 math on the same (bf16) inputs: the two
    round at different points (and the interpreter truncates float32 -> bf16 casts, which a GPU
    rounds to nearest), so each is within bf16 tolerance of the exact result, not of the other."""
    x, w13, w2, weights, ids = _problem(*shape, dtype, seed=1)
    out = moe.fused_moe(x, w13, w2, weights, ids, activation)
    expected = moe_reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids, activation)
    assert_close(out, expected.to(dtype))


def test_triton_handles_strided_inputs_int64_ids_and_no_tokens(assert_close):
    x, w13, w2, weights, ids = _problem(9, 6, 2, 32, 24, torch.float32, seed=2)
    wide = torch.zeros(9, 64)
    wide[:, ::2] = x  # hidden_states with a column stride of 2
    out = moe.fused_moe(wide[:, ::2], w13, w2, weights, ids.long(), "silu")
    assert_close(out, moe_reference.fused_moe(x, w13, w2, weights, ids, "silu"))
    empty = moe.fused_moe(x[:0], w13, w2, weights[:0], ids[:0])
    assert empty.shape == (0, 32) and moe_reference.fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)


def test_triton_drops_pairs_with_out_of_range_expert_ids(assert_close):
    """Ids are not checked on the device (no sync): such pairs contribute nothing."""
    x, w13, w2, weights, ids = _problem(6, 4, 2, 16, 16, torch.float32, seed=3)
    bad = ids.clone()
    bad[1, 0], bad[4, 1] = -1, 4
    out = moe.fused_moe(x, w13, w2, weights, bad)
    kept = weights.clone()
    kept[1, 0] = kept[4, 1] = 0.0
    assert_close(out, moe_reference.fused_moe(x, w13, w2, kept, ids))
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 4\)"):
        moe_reference.fused_moe(x, w13, w2, weights, bad)


@pytest.mark.parametrize("block_m", [4, 16])
def test_align_block_size_pads_each_expert_to_whole_blocks(block_m):
    num_experts, top_k = 5, 2
    ids = torch.randint(0, num_experts - 1, (23, top_k), generator=torch.Generator().manual_seed(4)).int()
    sorted_ids, block_experts, num_padded = moe.moe_align_block_size(ids, block_m, num_experts)
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    assert int(num_padded) == int(padded.sum())
    assert sorted_ids.shape[0] == block_experts.shape[0] * block_m
    used = sorted_ids[: int(num_padded)].long()
    real = used[used < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every pair exactly once
    for b in range(int(num_padded) // block_m):
        pairs = used[b * block_m : (b + 1) * block_m]
        pairs = pairs[pairs < flat.numel()]
        assert len(pairs) and bool((flat[pairs] == block_experts[b]).all())  # one expert per block
    assert bool((sorted_ids[int(num_padded):] == flat.numel()).all())
    assert bool((block_experts[int(num_padded) // block_m :] == num_experts).all())


@pytest.mark.parametrize("renormalize", [True, False])
def test_select_experts_matches_transformers_router(renormalize):
    config = MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)
    router = MixtralTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(11, 16, generator=torch.Generator().manual_seed(5))
    logits, hf_weights, hf_ids = router(x)
    weights, ids = reference.select_experts(logits, 2, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and weights.shape == (11, 2)
    assert torch.equal(ids.long(), hf_ids)
    if renormalize:  # transformers' Mixtral router always renormalises
        torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-7)
    else:
        torch.testing.assert_close(weights, torch.softmax(logits.float(), -1).gather(1, hf_ids))
    w_bf16, ids_bf16 = triton_ops.select_experts(logits.bfloat16(), 2, renormalize)
    assert w_bf16.dtype == torch.float32 and ids_bf16.shape == (11, 2)


def _hf_block(num_experts=6, top_k=2, hidden=24, inter=40, seed=6, impl="eager"):
    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                           num_experts_per_tok=top_k)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return config, block


@pytest.mark.parametrize("backend,impl", [("torch", "eager"), ("torch", "grouped_mm"), ("triton", "eager")])
def test_layer_equals_transformers_block_fused_layout(backend, impl):
    config, block = _hf_block(impl=impl)
    layer = FusedMoE(6, 2, 24, 40, get_ops(backend), params_dtype=torch.float32)
    state = block.state_dict()  # transformers 5: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "gate.weight": (6, 24), "experts.gate_up_proj": (6, 80, 24), "experts.down_proj": (6, 24, 40)}
    for param_name, fragment, expert_id, shard_id in FusedMoE.fused_params_mapping():
        param = getattr(layer, param_name.split(".")[-1])
        param.weight_loader(param, state[fragment], expert_id, shard_id)
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = block(x).reshape(18, 24)
        out = layer(x.reshape(18, 24), F.linear(x.reshape(18, 24), block.gate.weight))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_layer_loads_the_per_expert_checkpoint_transformers_saves(tmp_path):
    config = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(8)
    model = MixtralForCausalLM(config).eval()
    hf_moe = model.model.layers[0].mlp
    for p in hf_moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    prefix = "model.layers.0.block_sparse_moe."
    moe_keys = {k[len(prefix):]: tuple(v.shape) for k, v in saved.items() if k.startswith(prefix)}
    assert moe_keys == {"gate.weight": (4, 16), **{f"experts.{e}.{w}.weight": (16, 24) if w == "w2" else (24, 16)
                                                   for e in range(4) for w in ("w1", "w2", "w3")}}
    layer = FusedMoE(4, 2, 16, 24, get_ops("torch"))
    params = {f"experts.{n}": p for n, p in layer.named_parameters()}
    mapping = FusedMoE.expert_params_mapping(4)
    assert ("experts.w13_weight", "experts.3.w1.weight", 3, "w1") in mapping and len(mapping) == 12
    loaded = set()
    for name, tensor in saved.items():
        for param_name, fragment, expert_id, shard_id in mapping:
            if name.endswith("." + fragment):
                params[param_name].weight_loader(params[param_name], tensor, expert_id, shard_id)
                loaded.add((expert_id, shard_id))
    assert len(loaded) == 12
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = hf_moe(x[None])[0]
        out = layer(x, F.linear(x, saved[prefix + "gate.weight"]))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_shards_sum_to_the_full_layer():
    _, block = _hf_block(num_experts=4, inter=40)
    state = block.state_dict()
    full = FusedMoE(4, 2, 24, 40, reference)
    ranks = [FusedMoE(4, 2, 24, 40, reference, tp_size=2, reduce_results=False,
                      parallel=ParallelState(tp_rank=r, tp_size=2, group=object())) for r in range(2)]
    for layer in [full, *ranks]:
        layer.w13_weight.weight_loader(layer.w13_weight, state["experts.gate_up_proj"], None, "w13")
        for e in range(4):  # per-expert down projections, to exercise that path's slicing too
            layer.w2_weight.weight_loader(layer.w2_weight, state["experts.down_proj"][e], e, "w2")
    assert ranks[1].w13_weight.shape == (4, 40, 24) and ranks[1].w2_weight.shape == (4, 24, 20)
    torch.testing.assert_close(ranks[1].w13_weight[:, 20:], state["experts.gate_up_proj"][:, 60:])
    x = torch.randn(10, 24, generator=torch.Generator().manual_seed(10))
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(ranks[0](x, logits) + ranks[1](x, logits), full(x, logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fused_moe", "select_experts"])
def test_same_signature_in_both_modules(name):
    assert inspect.signature(getattr(triton_ops, name)) == inspect.signature(getattr(reference, name))
    assert getattr(get_ops("torch"), name) is getattr(moe_reference, name)


@pytest.mark.parametrize("module", [moe_reference, moe], ids=["torch", "triton"])
def test_bad_inputs_raise_value_error(module):
    x, w13, w2, weights, ids = _problem(4, 4, 2, 16, 8, torch.float32)
    cases = [
        ((x[0], w13, w2, weights, ids), "hidden_states must be"),
        ((x.long(), w13, w2, weights, ids), "hidden_states must be one of"),
        ((x, w13[:, :, :8], w2, weights, ids), "w13 must be"),
        ((x, w13[:, :15], w2, weights, ids), "w13 must be"),
        ((x, w13, w2[:, :, :4], weights, ids), "w2 must be"),
        ((x, w13.bfloat16(), w2, weights, ids), "dtype"),
        ((x, w13, w2, weights, ids[:3]), "topk_ids must be"),
        ((x, w13, w2, weights, ids.float()), "int32 or int64"),
        ((x, w13, w2, weights[:, :1], ids), "one shape"),
        ((x, w13, w2, weights.int(), ids), "floating point"),
        ((x, w13[:1], w2[:1], weights, ids), "exceeds num_experts"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            module.fused_moe(*args)
    with pytest.raises(ValueError, match="unknown MoE activation 'relu'"):
        module.fused_moe(x, w13, w2, weights, ids, "relu")
    with pytest.raises(ValueError, match="top_k must be"):
        module.select_experts(torch.randn(4, 4), 5, True)
    with pytest.raises(ValueError, match="router_logits must be"):
        module.select_experts(torch.randn(4), 1, True)


def test_layer_rejects_bad_configuration_and_weights():
    ops = get_ops("torch")
    with pytest.raises(ValueError, match="unknown MoE activation"):
        FusedMoE(4, 2, 16, 8, ops, activation="relu")
    with pytest.raises(ValueError, match="top_k"):
        FusedMoE(4, 5, 16, 8, ops)
    with pytest.raises(ValueError, match="needs parallel"):
        FusedMoE(4, 2, 16, 8, ops, tp_size=2)
    with pytest.raises(ValueError, match="not divisible"):
        FusedMoE(4, 2, 16, 9, ops, parallel=ParallelState(tp_rank=0, tp_size=2, group=object()))
    layer = FusedMoE(4, 2, 16, 8, ops)
    w13, w2 = layer.w13_weight, layer.w2_weight
    cases = [
        ((w13, torch.zeros(8, 15), 0, "w1"), "has shape"),
        ((w13, torch.zeros(16, 8), 0, "w3"), "has shape"),
        ((w2, torch.zeros(8, 16), 1, "w2"), "has shape"),
        ((w13, torch.zeros(4, 8, 16), None, "w13"), "has shape"),
        ((w2, torch.zeros(4, 16, 9), None, "w2"), "has shape"),
        ((w13, torch.zeros(8, 16), 4, "w1"), "expert_id must be"),
        ((w13, torch.zeros(8, 16), None, "w1"), "needs an expert_id"),
        ((w13, torch.zeros(4, 16, 16), 0, "w13"), "expert_id=None"),
        ((w2, torch.zeros(8, 16), 0, "w1"), "does not load into"),
        ((w13, torch.zeros(8, 16), 0, "gate"), "unknown shard_id"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            layer.weight_loader(*args)
