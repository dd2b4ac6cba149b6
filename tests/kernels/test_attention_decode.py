"""Triton paged decode attention against the PyTorch reference (interpreter on the CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from pageant.kernels import reference, triton_ops
from pageant.kernels.attention_decode import choose_num_splits, decode_attention

CASES = [
    # (seq_lens, block_size, num_heads, num_kv_heads, head_dim)
    ([1, 70, 17, 32], 16, 4, 4, 16),  # MHA, a 1-token context, full and partial last blocks
    ([9, 64, 33], 8, 8, 2, 32),  # GQA 4, block size 8
    ([70, 5], 16, 6, 2, 64),  # GQA 3: group not a power of two
    ([40, 23, 1], 8, 8, 1, 24),  # MQA, head_dim not a power of two (padded with masks)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(case, dtype, num_splits, paged_kv, assert_close):
    seq_lens, block_size, num_heads, num_kv_heads, head_dim = CASES[case]
    kv = paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed=case)
    gen = torch.Generator().manual_seed(100 + case)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = 1.0 / math.sqrt(head_dim)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    actual = decode_attention(
        query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale, num_splits=num_splits, block_n=16
    )
    assert_close(actual, expected)


def test_public_entry_point_chooses_splits(paged_kv, assert_close):
    """The fixed-signature function, with its own split heuristic, on a wide (padded) block table."""
    kv = paged_kv([3, 66], 16, 2, 32, torch.float32, seed=7)
    kv.block_tables = torch.cat([kv.block_tables, torch.full((2, 5), kv.poison_block, dtype=torch.int32)], dim=1)
    query = torch.randn(2, 4, 32)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.2)
    actual = triton_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.2)
    assert_close(actual, expected)


def test_padding_entries_are_never_read(paged_kv, assert_close):
    """Block-table entries past a sequence's length may hold garbage ids (the reference needs valid ones)."""
    kv = paged_kv([5, 40], 8, 2, 16, torch.float32, seed=3, extra_width=2)
    query = torch.randn(2, 2, 16)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.25)
    garbage = kv.block_tables.clone()
    garbage[0, 1:] = 2**30
    garbage[1, 5:] = -(2**30)
    for splits in (1, 4):
        actual = decode_attention(query, kv.k_cache, kv.v_cache, garbage, kv.seq_lens, 0.25, num_splits=splits, block_n=16)
        assert_close(actual, expected)


def test_more_splits_than_steps(paged_kv, assert_close):
    """Empty splits (a short sequence cut into many chunks) add nothing to the result."""
    kv = paged_kv([2, 17], 16, 1, 16, torch.float32, seed=5)
    query = torch.randn(2, 1, 16)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.5)
    actual = decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.5, num_splits=8, block_n=16)
    assert_close(actual, expected)


def test_reference_matches_float64_softmax(paged_kv):
    """The ground truth itself: the reference against a direct float64 computation."""
    kv = paged_kv([7, 20], 8, 2, 16, torch.float32, seed=11)
    query = torch.randn(2, 4, 16)
    out = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.3)
    for i, n in enumerate(kv.seq_lens.tolist()):
        slots = [int(kv.block_tables[i, t // 8]) * 8 + t % 8 for t in range(n)]
        k = kv.k_cache.flatten(0, 1)[slots].double().repeat_interleave(2, dim=1)  # [n, h, d]
        v = kv.v_cache.flatten(0, 1)[slots].double().repeat_interleave(2, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", query[i].double(), k) * 0.3, dim=-1)
        torch.testing.assert_close(out[i].double(), torch.einsum("hn,nhd->hd", p, v), rtol=1e-5, atol=1e-5)


def test_empty_batch():
    query = torch.empty(0, 4, 16)
    cache = torch.zeros(2, 8, 2, 16)
    out = triton_ops.paged_attention_decode(
        query, cache, cache, torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 1.0
    )
    assert out.shape == (0, 4, 16)


def test_bad_head_counts_are_rejected():
    cache = torch.zeros(2, 8, 3, 16)
    with pytest.raises(ValueError, match="multiple"):
        triton_ops.paged_attention_decode(
            torch.zeros(1, 4, 16), cache, cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0
        )


@pytest.mark.parametrize(
    ("num_seqs", "max_context", "expected"),
    [(1, 8192, 32), (256, 8192, 1), (4, 8192, 9), (1, 128, 1), (1, 512, 4)],
)
def test_split_heuristic(num_seqs, max_context, expected):
    """132 SMs (H100), 8 kv heads, 64-token steps: ~2 programs per SM, >= 2 steps per split."""
    assert choose_num_splits(num_seqs, 8, max_context, 64, 132) == expected


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(8, 2, 128), (4, 1, 256), (4, 2, 80)])
def test_model_head_sizes_with_default_launch_and_a_strided_query(num_heads, num_kv_heads, head_dim, paged_kv, assert_close):
    """Llama-like head_dim 128, Gemma-like 256 (smaller key steps), 80 (padded); query sliced from a fused qkv."""
    kv = paged_kv([19, 45], 16, num_kv_heads, head_dim, torch.bfloat16, seed=head_dim)
    qkv = torch.randn(2, num_heads + 2 * num_kv_heads, head_dim).to(torch.bfloat16)
    query = qkv[:, :num_heads]  # [num_seqs, num_heads, head_dim], row stride > num_heads * head_dim
    scale = head_dim**-0.5
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    actual = triton_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    assert_close(actual, expected)


def test_group_wider_than_sixteen_heads(paged_kv, assert_close):
    """MQA with 32 query heads on one kv head: the packed query tile grows past the 16-row minimum."""
    kv = paged_kv([12, 30], 8, 1, 16, torch.float32, seed=21)
    query = torch.randn(2, 32, 16)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.3)
    actual = decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.3, num_splits=2, block_n=16)
    assert_close(actual, expected)


def test_strided_metadata(paged_kv, assert_close):
    """seq_lens and block_tables as strided views (every other element of bigger buffers)."""
    kv = paged_kv([9, 30], 8, 2, 16, torch.float32, seed=8)
    tables = torch.zeros(2, 2 * kv.block_tables.shape[1], dtype=torch.int32)
    tables[:, ::2] = kv.block_tables
    lens = torch.zeros(4, dtype=torch.int32)
    lens[::2] = kv.seq_lens
    query = torch.randn(2, 4, 16)
    expected = reference.paged_attention_decode(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.3)
    actual = triton_ops.paged_attention_decode(query, kv.k_cache, kv.v_cache, tables[:, ::2], lens[::2], 0.3)
    assert_close(actual, expected)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_empty_context_gives_zeros_not_nan(paged_kv, num_splits):
    """A padding sequence with seq_len 0 (e.g. a batch padded for a CUDA graph) yields zeros."""
    kv = paged_kv([20, 1], 8, 1, 16, torch.float32, seed=2)
    seq_lens = torch.tensor([20, 0], dtype=torch.int32)
    query = torch.randn(2, 2, 16)
    out = decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, seq_lens, 0.3, num_splits=num_splits, block_n=16)
    assert torch.equal(out[1], torch.zeros(2, 16))
    expected = reference.paged_attention_decode(query[:1], kv.k_cache, kv.v_cache, kv.block_tables[:1], seq_lens[:1], 0.3)
    torch.testing.assert_close(out[:1], expected, rtol=1e-5, atol=1e-5)
