"""Triton kernels with the signatures of ``pageant.kernels.reference`` (the engine's GPU path).

Each function validates shapes on the host (without reading device data, so no sync) and launches
its kernel; see the kernel modules for the work split of each one:

- ``cache_ops``: ``reshape_and_cache`` (an FP8 cache gets ``k / k_scale``, ``v / v_scale`` in e4m3)
- ``attention_decode``: ``paged_attention_decode`` (GQA-packed, split-K + reduce)
- ``attention_prefill``: ``paged_attention_prefill`` (causal, cached prefix + new tokens)
- ``norm_ops``: ``rms_norm``, ``fused_add_rms_norm``
- ``rotary_ops``: ``rotary_embedding``

On the CPU the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1``, set before this
module is first imported); otherwise they raise a clear error on CPU tensors.
"""

from __future__ import annotations

import torch

from pageant.kernels.attention_decode import decode_attention
from pageant.kernels.attention_prefill import prefill_attention
from pageant.kernels.cache_ops import reshape_and_cache
from pageant.kernels.moe import fused_moe, select_experts
from pageant.kernels.norm_ops import fused_add_rms_norm, rms_norm
from pageant.kernels.rotary_ops import rotary_embedding

__all__ = [
    "reshape_and_cache",
    "paged_attention_decode",
    "paged_attention_prefill",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "fused_moe",
    "select_experts",
]


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
    """One query token per sequence attending to its whole cached context (GQA aware), or to its
    last ``sliding_window`` positions; scores soft-capped by ``logits_soft_cap`` (see ``attention_masks``);
    an FP8 cache is read through ``k_scale`` / ``v_scale``."""
    return decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale,
                            sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                            k_scale=k_scale, v_scale=v_scale)


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
    optionally windowed and soft-capped (``sliding_window``, ``logits_soft_cap``: see ``attention_masks``);
    an FP8 cache is read through ``k_scale`` / ``v_scale``."""
    return prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                             sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
                             k_scale=k_scale, v_scale=v_scale)
