"""The engine's CPU kernels (``pageant.kernels.get_ops("torch")``): every function of
``pageant.kernels.reference``, with the paged attention that reads the KV pool in place.

``paged_attention_decode`` and ``paged_attention_prefill`` run the C++ kernels of
``pageant.kernels.cpu_attention`` (walked through the block tables: no per-step gather of the
sequences' pages, float32 math, float32 / bfloat16 / float16 / FP8-e4m3 caches), with the reference's
signatures and semantics (sliding window, soft cap, FP8 scales, zeros for ``seq_len`` 0 rows). CUDA
tensors, other dtypes or a failed build (logged once) run the reference instead. The reference
module itself stays unchanged: the tests' ground truth.

Importing this module builds (once per machine) or loads the C++ library.
"""

from __future__ import annotations

import torch

from pageant.kernels import cpu_attention, reference
from pageant.kernels.attention_masks import check_attention_options, visible_keys
from pageant.kernels.reference import (  # the reference's other functions and constants, as they are
    FP8_DTYPE,
    FP8_MAX,
    fused_add_rms_norm,
    fused_moe,
    quantize_fp8,
    reshape_and_cache,
    rms_norm,
    rotary_embedding,
    select_experts,
)

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "quantize_fp8", "reshape_and_cache", "paged_attention_decode", "paged_attention_prefill",
    "rms_norm", "fused_add_rms_norm", "rotary_embedding", "fused_moe", "select_experts", "check_attention_options",
    "visible_keys",
]

cpu_attention.load()


def paged_attention_decode(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: cached tokens, the query's own included
    scale: float,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,  # FP8 cache only: dequantization scales (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """One query token per sequence attending to its whole cached context (GQA aware), read in place
    through ``block_tables``; see ``reference.paged_attention_decode`` for the semantics."""
    sliding_window, logits_soft_cap = check_attention_options(sliding_window, logits_soft_cap)
    if query.shape[0] == 0 or not cpu_attention.supports(query, k_cache, v_cache, block_tables, seq_lens):
        return reference.paged_attention_decode(query, k_cache, v_cache, block_tables, seq_lens, scale,
                                                sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                                k_scale=k_scale, v_scale=v_scale)
    return cpu_attention.decode(query, k_cache, v_cache, block_tables, seq_lens, scale, sliding_window,
                                logits_soft_cap, k_scale, v_scale)


def paged_attention_prefill(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: cumulative query lengths, starts at 0
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length after this step (cached + new)
    scale: float,
    *,
    sliding_window: int | None = None,
    logits_soft_cap: float | None = None,
    k_scale: torch.Tensor | None = None,  # FP8 cache only: dequantization scales (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Many query tokens per sequence: causal attention over cached prefix pages plus new tokens,
    read in place through ``block_tables``; see ``reference.paged_attention_prefill``."""
    sliding_window, logits_soft_cap = check_attention_options(sliding_window, logits_soft_cap)
    if not cpu_attention.supports(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens):
        return reference.paged_attention_prefill(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                                 scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                                                 k_scale=k_scale, v_scale=v_scale)
    return cpu_attention.prefill(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                 sliding_window, logits_soft_cap, k_scale, v_scale)
