"""Kernel tests: shared builders for paged KV caches.

Triton runs in its CPU interpreter: the root tests/conftest.py sets ``TRITON_INTERPRET`` before
any kernel module is imported (Triton picks the interpreter when a kernel is decorated).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
POISON = 1000.0  # written into blocks no sequence owns: a kernel that reads one is far off


@dataclass
class PagedKV:
    """A random paged cache holding ``seq_lens`` tokens per sequence in shuffled blocks."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padding -> the poison block
    seq_lens: torch.Tensor  # [num_seqs] int32
    poison_block: int


def build_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed, extra_width=1):
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_used = sum(blocks_per_seq)
    num_blocks = num_used + 3  # spare blocks stay poisoned
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON).to(dtype)
    v_cache = torch.full(shape, POISON).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    poison_block = int(order[-1])
    width = max(blocks_per_seq) + extra_width
    block_tables = torch.full((len(seq_lens), width), poison_block, dtype=torch.int32)
    cursor = 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = order[cursor : cursor + nb]
        cursor += nb
        block_tables[i, :nb] = ids.to(torch.int32)
        for t in range(n):  # only the sequence's own slots get data; a partial last block keeps poison
            b, o = int(ids[t // block_size]), t % block_size
            k_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[b, o] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
    return PagedKV(k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32), poison_block)


@pytest.fixture
def paged_kv():
    """``paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed)`` -> PagedKV."""
    return build_paged_kv


@pytest.fixture
def assert_close():
    """Compare a kernel's output with the reference at the dtype's tolerance; no NaN passes."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        assert torch.isfinite(actual).all(), "non-finite values in the kernel's output"
        tol = TOLERANCES[dtype or expected.dtype]
        torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)

    return check
