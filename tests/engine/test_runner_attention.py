"""The torch decode attention (grouped by context length) against a plain per-sequence softmax."""

import math

import pytest
import torch

from pageant.kernels import reference


def _naive_decode(query, k_cache, v_cache, block_tables, seq_lens, scale):
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        slots = [int(block_tables[i, p // block_size]) * block_size + p % block_size for p in range(n)]
        k = k_cache.flatten(0, 1)[slots]  # [n, kvh, d]
        v = v_cache.flatten(0, 1)[slots]
        for h in range(num_heads):
            scores = (k[:, h // group] @ query[i, h]) * scale  # [n]
            out[i, h] = scores.softmax(-1) @ v[:, h // group]
    return out


@pytest.mark.parametrize("lens", [[5], [1, 17, 40, 3, 64, 33, 2, 16], [30, 0, 12, 0], [48, 47, 46]])
def test_grouped_decode_matches_naive(lens):
    torch.manual_seed(0)
    block_size, num_blocks, num_heads, num_kv_heads, head_dim = 4, 256, 4, 2, 8
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    width = max(1, math.ceil(max(lens) / block_size))
    block_tables = torch.randperm(num_blocks)[: len(lens) * width].view(len(lens), width).int()
    query = torch.randn(len(lens), num_heads, head_dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    got = reference.paged_attention_decode(query, k_cache, v_cache, block_tables, seq_lens, 0.3)
    want = _naive_decode(query, k_cache, v_cache, block_tables, seq_lens, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not got[seq_lens == 0].any()  # padding rows (seq_len 0) give zeros, as the Triton kernel


def test_decode_groups_split_by_length():
    order, spans = reference._decode_groups([10, 100, 90, 11, 50])
    assert [[order[j] for j in range(a, b)] for a, b in spans] == [[1, 2], [4], [3, 0]]


def test_decode_groups_cap_padded_tokens(monkeypatch):
    monkeypatch.setattr(reference, "_DECODE_GROUP_TOKENS", 300)
    order, spans = reference._decode_groups([100, 100, 100, 100, 400])
    assert [b - a for a, b in spans] == [1, 3, 1]  # 400 alone (over the cap on its own), then 3 x 100
