"""Triton paged prefill/extend attention against the PyTorch reference (interpreter on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from pageant.kernels import reference, triton_ops
from pageant.kernels.attention_prefill import prefill_attention

CASES = [
    # (seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim)
    ([20, 70, 9], [20, 70, 9], 16, 4, 4, 16),  # fresh prompts, MHA
    ([45, 33, 12, 16], [13, 1, 0, 16], 8, 8, 2, 32),  # cached prefixes, a 1-token extend, an idle sequence
    ([70, 18], [6, 18], 16, 6, 2, 64),  # GQA 3 (not a power of two)
    ([37, 5], [30, 5], 8, 4, 1, 24),  # MQA, head_dim padded with masks
]


def _query_start_loc(q_lens):
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("block_m", [16, 64])
def test_prefill_matches_reference(case, dtype, block_m, paged_kv, assert_close):
    seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim = CASES[case]
    kv = paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed=case)
    gen = torch.Generator().manual_seed(200 + case)
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    qsl = _query_start_loc(q_lens)
    scale = 1.0 / math.sqrt(head_dim)
    expected = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale)
    actual = prefill_attention(
        query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale, block_m=block_m, block_n=16
    )
    assert_close(actual, expected)


def test_public_entry_point_with_garbage_padding(paged_kv, assert_close):
    """Default launch settings; block-table entries past each sequence hold out-of-range ids."""
    kv = paged_kv([29, 50], 16, 2, 32, torch.float32, seed=9, extra_width=2)
    q_lens = [29, 7]
    query = torch.randn(sum(q_lens), 4, 32)
    qsl = _query_start_loc(q_lens)
    expected = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, 0.2)
    garbage = kv.block_tables.clone()
    garbage[0, 2:] = 2**30
    garbage[1, 4:] = -1
    actual = triton_ops.paged_attention_prefill(query, kv.k_cache, kv.v_cache, garbage, qsl, kv.seq_lens, 0.2)
    assert_close(actual, expected)


def test_prefill_of_single_tokens_equals_decode(paged_kv, assert_close):
    """q_len 1 everywhere: the prefill kernel computes what the decode kernel does."""
    kv = paged_kv([3, 40, 17], 8, 2, 16, torch.float32, seed=4)
    query = torch.randn(3, 4, 16)
    qsl = _query_start_loc([1, 1, 1])
    decode = triton_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.3)
    prefill = triton_ops.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, 0.3)
    assert_close(prefill, decode)


def test_reference_is_causal_attention_in_float64(paged_kv):
    """The ground truth itself: one sequence with a cached prefix against a direct float64 computation."""
    kv = paged_kv([21], 8, 1, 16, torch.float32, seed=12)
    q_len, ctx = 6, 15
    query = torch.randn(q_len, 2, 16)
    out = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, _query_start_loc([q_len]), kv.seq_lens, 0.4)
    slots = [int(kv.block_tables[0, t // 8]) * 8 + t % 8 for t in range(21)]
    k = kv.k_cache.flatten(0, 1)[slots, 0].double()  # [21, d]
    v = kv.v_cache.flatten(0, 1)[slots, 0].double()
    for j in range(q_len):
        visible = ctx + j + 1
        for h in range(2):
            p = torch.softmax(k[:visible] @ query[j, h].double() * 0.4, dim=0)
            torch.testing.assert_close(out[j, h].double(), p @ v[:visible], rtol=1e-5, atol=1e-5)


def test_empty_and_invalid_inputs():
    cache = torch.zeros(2, 8, 2, 16)
    tables = torch.zeros(1, 1, dtype=torch.int32)
    out = triton_ops.paged_attention_prefill(
        torch.empty(0, 2, 16), cache, cache, tables, torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 1.0
    )
    assert out.shape == (0, 2, 16)
    with pytest.raises(ValueError, match="query_start_loc"):
        triton_ops.paged_attention_prefill(
            torch.zeros(3, 2, 16), cache, cache, tables, torch.zeros(3, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0
        )


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 128), (4, 1, 256), (4, 2, 80)])
def test_model_head_sizes_with_default_launch_and_a_strided_query(num_heads, num_kv_heads, head_dim, paged_kv, assert_close):
    """Llama-like head_dim 128, Gemma-like 256 (smaller tiles), 80 (padded); query sliced from a fused qkv."""
    kv = paged_kv([19, 45], 16, num_kv_heads, head_dim, torch.bfloat16, seed=head_dim)
    q_lens = [19, 12]
    qkv = torch.randn(sum(q_lens), num_heads + 2 * num_kv_heads, head_dim).to(torch.bfloat16)
    query = qkv[:, :num_heads]
    qsl = _query_start_loc(q_lens)
    scale = head_dim**-0.5
    expected = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale)
    actual = triton_ops.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, scale)
    assert_close(actual, expected)


def test_group_wider_than_the_row_block(paged_kv, assert_close):
    """MQA with 32 query heads and block_m 16: each program takes one token's whole group."""
    kv = paged_kv([12, 30], 8, 1, 16, torch.float32, seed=21)
    q_lens = [5, 9]
    query = torch.randn(sum(q_lens), 32, 16)
    qsl = _query_start_loc(q_lens)
    expected = reference.paged_attention_prefill(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, 0.3)
    actual = prefill_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, qsl, kv.seq_lens, 0.3, block_m=16, block_n=16)
    assert_close(actual, expected)
