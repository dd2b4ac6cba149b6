"""Every Triton kernel against its PyTorch reference on CUDA, in bfloat16 and float16.

The reference runs on the same device in float32 on the same (rounded) inputs; the check is
``||out - ref|| / ||ref||`` under ``REL_TOL`` (METHOD.md), no NaN passes, and unused cache slots hold
``POISON`` so a kernel that reads one is far off. Shapes: a small case first (the one the CPU dry
run keeps), then Llama-3.1-8B's attention (32 heads on 8 KV heads of 128, block 16) and wider ones.
"""

from __future__ import annotations

import pytest
import torch

from pageant.kernels import lora as tri_lora
from pageant.kernels import lora_reference as ref_lora
from pageant.kernels import moe_reference, reference, triton_ops
from tests.gpu.conftest import assert_rel_close, build_paged_kv

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]
# (seq_lens, block_size, num_heads, num_kv_heads, head_dim)
DECODE = {
    "small": ([1, 37, 16], 16, 4, 2, 32),
    "llama8b": ([1, 17, 300, 1029, 4096, 2000], 16, 32, 8, 128),
    "gemma-256": ([5, 700, 129], 16, 8, 4, 256),
    "mqa-80": ([64, 999], 16, 16, 1, 80),
}
# (seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim): fresh prompts, cached prefixes
# (extend), a 1-token extend and an idle sequence
PREFILL = {
    "small": ([20, 33, 9], [20, 5, 0], 16, 4, 2, 32),
    "llama8b": ([512, 1100, 77, 300, 16], [512, 100, 1, 300, 0], 16, 32, 8, 128),
    "gqa3-64": ([257, 90], [129, 90], 16, 12, 4, 64),
}
# (sliding_window, logits_soft_cap)
OPTIONS = [(8, None), (None, 30.0), (100, 50.0), (1, None), (4096, None)]


def _f32(*tensors):
    return [t.float() for t in tensors]


def _qsl(q_lens, device):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _decode_case(name, dtype, device, seed):
    seq_lens, block_size, heads, kv_heads, head_dim = DECODE[name]
    kv = build_paged_kv(seq_lens, block_size, kv_heads, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(len(seq_lens), heads, head_dim, generator=gen).to(dtype).to(device)
    return kv, query, head_dim**-0.5


def _prefill_case(name, dtype, device, seed):
    seq_lens, q_lens, block_size, heads, kv_heads, head_dim = PREFILL[name]
    kv = build_paged_kv(seq_lens, block_size, kv_heads, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype).to(device)
    return kv, query, _qsl(q_lens, device), head_dim**-0.5


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(DECODE))
def test_decode_attention(case, dtype, device):
    kv, query, scale = _decode_case(case, dtype, device, seed=len(case))
    out = triton_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    q, k, v = _f32(query, kv.k_cache, kv.v_cache)
    ref = reference.paged_attention_decode(q, k, v, kv.block_tables, kv.seq_lens, scale)
    assert out.dtype == dtype and out.device.type == device
    assert_rel_close(out, ref, dtype, f"decode {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("window", "cap"), OPTIONS)
def test_decode_window_and_soft_cap(window, cap, dtype, device):
    kv, query, scale = _decode_case("small" if device == "cpu" else "llama8b", dtype, device, seed=3)
    options = dict(sliding_window=window, logits_soft_cap=cap)
    out = triton_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale,
                                            **options)
    q, k, v = _f32(query, kv.k_cache, kv.v_cache)
    ref = reference.paged_attention_decode(q, k, v, kv.block_tables, kv.seq_lens, scale, **options)
    assert_rel_close(out, ref, dtype, f"decode window={window} cap={cap}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(PREFILL))
def test_prefill_and_extend_attention(case, dtype, device):
    kv, query, qsl, scale = _prefill_case(case, dtype, device, seed=10 + len(case))
    out = triton_ops.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale)
    q, k, v = _f32(query, kv.k_cache, kv.v_cache)
    ref = reference.paged_attention_prefill(q, k, v, kv.block_tables, qsl, kv.seq_lens, scale)
    assert_rel_close(out, ref, dtype, f"prefill {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("window", "cap"), OPTIONS)
def test_prefill_window_and_soft_cap(window, cap, dtype, device):
    kv, query, qsl, scale = _prefill_case("small" if device == "cpu" else "llama8b", dtype, device, seed=4)
    options = dict(sliding_window=window, logits_soft_cap=cap)
    out = triton_ops.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens,
                                             scale, **options)
    q, k, v = _f32(query, kv.k_cache, kv.v_cache)
    ref = reference.paged_attention_prefill(q, k, v, kv.block_tables, qsl, kv.seq_lens, scale, **options)
    assert_rel_close(out, ref, dtype, f"prefill window={window} cap={cap}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_tokens", "kv_heads", "head_dim"), [(21, 2, 32), (4096, 8, 128), (3, 1, 256)])
def test_kv_write(num_tokens, kv_heads, head_dim, dtype, device):
    """``reshape_and_cache`` is a copy: exactly the reference's cache, padding slots (-1) skipped."""
    gen = torch.Generator().manual_seed(num_tokens)
    block_size, num_blocks = 16, -(-num_tokens // 16) + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[1::5] = -1  # padding tokens: skipped
    # key/value sliced out of a fused qkv, as the engine passes them
    qkv = torch.randn(num_tokens, 4 + 2 * kv_heads, head_dim, generator=gen).to(dtype).to(device)
    key, value = qkv[:, 4:4 + kv_heads], qkv[:, 4 + kv_heads:]
    init = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(device)
    k_ref, v_ref, k_out, v_out = init.clone(), -init, init.clone(), -init
    slots = slots.to(device)
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    triton_ops.reshape_and_cache(key, value, k_out, v_out, slots)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    assert not torch.equal(k_out, init)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_tokens", "hidden"), [(7, 64), (1, 4096), (300, 4096), (33, 5120)])
def test_rms_norms(num_tokens, hidden, dtype, device):
    gen = torch.Generator().manual_seed(hidden + num_tokens)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(dtype).to(device)
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(device)
    assert_rel_close(triton_ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x.float(), weight.float(), 1e-5),
                     dtype, "rms_norm")
    normed, new_residual = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    normed_ref, residual_ref = reference.fused_add_rms_norm(x.float(), residual.float(), weight.float(), 1e-5)
    assert_rel_close(new_residual, residual_ref, dtype, "fused_add residual")
    assert_rel_close(normed, normed_ref, dtype, "fused_add_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_tokens", "heads", "kv_heads", "head_dim"), [(6, 4, 2, 16), (512, 32, 8, 128),
                                                                          (3, 8, 4, 256)])
def test_rotary(num_tokens, heads, kv_heads, head_dim, dtype, device):
    gen = torch.Generator().manual_seed(head_dim)
    max_position = 8192
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_position).float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(device)
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype).to(device)
    query, key = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
    q_out, k_out = triton_ops.rotary_embedding(positions, query, key, cache)
    q_ref, k_ref = reference.rotary_embedding(positions, query.float(), key.float(), cache)
    assert_rel_close(q_out, q_ref, dtype, "rotary query")
    assert_rel_close(k_out, k_ref, dtype, "rotary key")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_tokens", "in_features", "out_features", "rank", "max_loras"),
                         [(7, 40, 64, 4, 3), (1, 4096, 4096, 16, 4), (256, 4096, 6144, 16, 4), (37, 4096, 1024, 8, 1)])
def test_lora_shrink_expand(num_tokens, in_features, out_features, rank, max_loras, dtype, device):
    gen = torch.Generator().manual_seed(num_tokens + rank)
    x = torch.randn(num_tokens, in_features, generator=gen).to(dtype).to(device)
    a = (torch.randn(max_loras, rank, in_features, generator=gen) / in_features**0.5).to(dtype).to(device)
    b = torch.randn(max_loras, out_features, rank, generator=gen).to(dtype).to(device)
    idx = torch.randint(-1, max_loras, (num_tokens,), generator=gen).to(torch.int32)
    if num_tokens >= 3:
        idx[0], idx[1] = -1, 0
    idx = idx.to(device)
    y = tri_lora.lora_shrink(x, a, idx, 0.5)
    y_ref = ref_lora.lora_shrink(x.float(), a.float(), idx, 0.5)
    assert y.dtype == torch.float32
    assert torch.all(y[idx == -1] == 0)
    if bool((idx >= 0).any()):
        assert_rel_close(y[idx >= 0], y_ref[idx >= 0], dtype, "lora_shrink")
    base = torch.randn(num_tokens, out_features + 8, generator=gen).to(dtype).to(device)
    out = tri_lora.lora_expand(y_ref, b, idx, base.clone(), offset=8)
    out_ref = ref_lora.lora_expand(y_ref, b.float(), idx, base.float(), offset=8)
    assert torch.equal(out[idx == -1], base[idx == -1]) and torch.equal(out[:, :8], base[:, :8])  # untouched
    assert_rel_close(out, out_ref, dtype, "lora_expand")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k", "hidden", "inter", "activation"),
                         [(5, 4, 2, 32, 48, "silu"), (1, 8, 2, 4096, 1792, "silu"), (300, 8, 2, 4096, 1792, "silu"),
                          (300, 8, 2, 4096, 1792, "gelu"), (64, 64, 6, 1024, 512, "silu")])
def test_fused_moe(num_tokens, num_experts, top_k, hidden, inter, activation, dtype, device):
    """Mixtral's decode (1 token) and a prefill-sized batch, GeGLU experts, many small experts."""
    gen = torch.Generator().manual_seed(num_tokens * num_experts)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype).to(device)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype).to(device)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype).to(device)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(device)
    weights, ids = triton_ops.select_experts(logits, top_k, renormalize=True)
    ref_weights, ref_ids = moe_reference.select_experts(logits, top_k, renormalize=True)
    assert torch.equal(ids.long(), ref_ids.long())
    out = triton_ops.fused_moe(x, w13, w2, weights, ids, activation)
    ref = moe_reference.fused_moe(x.float(), w13.float(), w2.float(), ref_weights, ref_ids, activation)
    assert out.dtype == dtype
    assert_rel_close(out, ref, dtype, f"fused_moe {activation}")
