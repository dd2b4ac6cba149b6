"""The paged attention call every model family makes: write this step's K/V, then attend.

A step's sequences come decodes first (see ``AttentionMetadata``): all-decode steps run the decode
kernel, all-prefill steps the prefill/extend kernel, mixed steps both on their halves.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pageant.engine.attention import AttentionMetadata


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache, GQA-aware.

    ``scale`` multiplies q·k (``head_dim ** -0.5`` for most models, Gemma 2's
    ``query_pre_attn_scalar ** -0.5``); ``sliding_window`` limits each query to the last that many
    positions, itself included; ``logits_soft_cap`` maps scores to ``cap * tanh(score / cap)``.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, ops: ModuleType, *,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale, self.ops = scale, ops
        self.sliding_window, self.logits_soft_cap = sliding_window, logits_soft_cap
        self.options: dict = {}
        if sliding_window is not None:
            self.options["sliding_window"] = sliding_window
        if logits_soft_cap is not None:
            self.options["logits_soft_cap"] = logits_soft_cap

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        ops, opts = self.ops, self.options
        num_tokens = q.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        ops.reshape_and_cache(k, v, k_cache, v_cache, md.slot_mapping)
        nd = md.num_decode_seqs
        if nd == md.num_seqs:
            out = ops.paged_attention_decode(q, k_cache, v_cache, md.block_tables, md.seq_lens, self.scale, **opts)
        elif nd == 0:
            out = ops.paged_attention_prefill(q, k_cache, v_cache, md.block_tables, md.query_start_loc,
                                              md.seq_lens, self.scale, **opts)
        else:
            out = torch.empty_like(q)
            out[:nd] = ops.paged_attention_decode(q[:nd], k_cache, v_cache, md.block_tables[:nd], md.seq_lens[:nd],
                                                  self.scale, **opts)
            out[nd:] = ops.paged_attention_prefill(
                q[nd:], k_cache, v_cache, md.block_tables[nd:], md.query_start_loc[nd:] - nd,
                md.seq_lens[nd:], self.scale, **opts,
            )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
