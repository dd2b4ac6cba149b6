"""Triton RMSNorm, fused add + RMSNorm and rotary embedding against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from pageant.kernels import reference, triton_ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 80])
def test_rms_norm(dtype, hidden, assert_close):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(7, hidden, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    assert_close(triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


def test_rms_norm_float32_weight_on_bf16_input_promotes_like_the_reference(assert_close):
    x = torch.randn(4, 64).to(torch.bfloat16)
    weight = torch.rand(64) + 0.5
    assert_close(triton_ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype, assert_close):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=gen).to(dtype)
    residual = (torch.randn(12, 64, generator=gen) * 4).to(dtype)[::2]  # a strided view
    weight = torch.randn(64, generator=gen).to(dtype)
    x_before, r_before = x.clone(), residual.clone()
    normed, new_residual = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    normed_ref, residual_ref = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    if dtype == torch.bfloat16:  # Triton's interpreter truncates float32 -> bf16 (a GPU rounds to nearest)
        assert_close(new_residual, residual_ref)
    else:
        assert torch.equal(new_residual, residual_ref)  # one rounding of the same sum
    assert_close(normed, normed_ref)
    assert torch.equal(x, x_before) and torch.equal(residual, r_before)  # inputs untouched


def _cos_sin_cache(max_position: int, rotary_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_position).float(), inv_freq)  # [max_position, rotary_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (6, 1, 64), (3, 3, 24)])
def test_rotary_embedding(dtype, num_heads, num_kv_heads, head_dim, assert_close):
    gen = torch.Generator().manual_seed(head_dim)
    positions = torch.tensor([0, 5, 63, 7, 7, 31])
    qkv = torch.randn(6, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    query, key = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]  # strided views
    cache = _cos_sin_cache(64, head_dim)
    q_out, k_out = triton_ops.rotary_embedding(positions, query, key, cache)
    q_ref, k_ref = reference.rotary_embedding(positions, query, key, cache)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)
    assert torch.equal(qkv[:, :num_heads], query)  # the input is not rotated in place


def test_rotary_position_zero_is_identity():
    query, key = torch.randn(1, 2, 32), torch.randn(1, 1, 32)
    q_out, k_out = triton_ops.rotary_embedding(torch.zeros(1, dtype=torch.long), query, key, _cos_sin_cache(4, 32))
    assert torch.equal(q_out, query) and torch.equal(k_out, key)


def test_partial_rotary_is_rejected_clearly():
    with pytest.raises(ValueError, match="partial rotary"):
        triton_ops.rotary_embedding(torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, 32), torch.zeros(1, 1, 32), _cos_sin_cache(4, 16))


def test_norms_accept_leading_dimensions_like_the_reference(assert_close):
    x, residual, weight = torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.rand(64)
    assert_close(triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    for actual, expected in zip(triton_ops.fused_add_rms_norm(x, residual, weight, 1e-6),
                                reference.fused_add_rms_norm(x, residual, weight, 1e-6)):
        assert_close(actual, expected)
    with pytest.raises(ValueError, match="hidden"):
        triton_ops.rms_norm(x, torch.ones(32), 1e-6)
