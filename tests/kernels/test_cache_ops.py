"""Triton KV-cache write (slot mapping) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from pageant.kernels import reference, triton_ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("block_size", "num_kv_heads", "head_dim"), [(16, 2, 16), (8, 1, 64), (8, 3, 24)])
def test_reshape_and_cache_matches_reference(dtype, block_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(block_size * head_dim)
    num_blocks, num_tokens = 6, 21
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7, 20]] = -1  # padding tokens: skipped
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    init = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_ref, v_ref, k_out, v_out = init.clone(), init.clone() * 2, init.clone(), init.clone() * 2
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    triton_ops.reshape_and_cache(key, value, k_out, v_out, slots)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    assert not torch.equal(k_out, init)  # something was written


def test_writes_into_a_layer_of_the_shared_pool_from_strided_views():
    """The engine passes ``kv_cache[layer, 0]`` views and key/value sliced out of a fused qkv."""
    gen = torch.Generator().manual_seed(0)
    kv_cache = torch.zeros(2, 2, 4, 8, 2, 16)  # [layers, k|v, blocks, block_size, kv_heads, d]
    qkv = torch.randn(5, 8, 16, generator=gen)  # [tokens, q_heads 4 + k 2 + v 2, d]
    key, value = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.tensor([3, 9, -1, 31, 16])
    expected = kv_cache.clone()
    reference.reshape_and_cache(key, value, expected[1, 0], expected[1, 1], slots)
    triton_ops.reshape_and_cache(key, value, kv_cache[1, 0], kv_cache[1, 1], slots)
    assert torch.equal(kv_cache, expected)
    assert kv_cache[0].abs().sum() == 0  # the other layer is untouched


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_casts_into_the_cache_dtype(cache_dtype, assert_close):
    key = torch.randn(3, 1, 16)
    k_cache = torch.zeros(1, 8, 1, 16, dtype=cache_dtype)
    v_cache = torch.zeros(1, 8, 1, 16, dtype=cache_dtype)
    triton_ops.reshape_and_cache(key, key * 3, k_cache, v_cache, torch.tensor([0, 5, 7]))
    if cache_dtype == torch.bfloat16:  # Triton's interpreter truncates float32 -> bf16 (a GPU rounds to nearest)
        assert_close(k_cache[0, [0, 5, 7]], key.to(cache_dtype))
        assert_close(v_cache[0, [0, 5, 7]], (key * 3).to(cache_dtype))
    else:
        assert torch.equal(k_cache[0, [0, 5, 7]], key.to(cache_dtype))
        assert torch.equal(v_cache[0, [0, 5, 7]], (key * 3).to(cache_dtype))
    assert k_cache[0, [1, 2, 3, 4, 6]].abs().sum() == 0  # other slots untouched


def test_shape_errors_are_clear():
    cache = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        triton_ops.reshape_and_cache(torch.zeros(3, 2, 16), torch.zeros(3, 2, 16), cache, cache, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="caches"):
        triton_ops.reshape_and_cache(torch.zeros(3, 1, 16), torch.zeros(3, 1, 16), cache, cache, torch.zeros(3, dtype=torch.long))
