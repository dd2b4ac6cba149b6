"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3) over a paged KV cache.

One model class covers the family; the differences are read from ``ModelConfig``: qkv bias
(Qwen2), per-head q/k RMSNorm (Qwen3), tied embeddings, rope scaling. q/k/v and gate/up are
merged into one matmul each; ``stacked_params`` tells the loader how checkpoint names map.

Every forward takes a flat batch: ``input_ids``/``positions`` ``[num_tokens]`` for all scheduled
sequences back to back (decodes first), plus the step's ``AttentionMetadata``.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig
from pageant.engine.rope import cos_sin_cache


class RMSNorm(nn.Module):
    """RMSNorm whose math lives in the kernels module (``ops.rms_norm``)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps


class Attention(nn.Module):
    """Self-attention with GQA, rotary embedding and paged KV reads/writes."""

    def __init__(self, cfg: ModelConfig, ops: ModuleType):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        x: torch.Tensor,  # [num_tokens, hidden]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        md: AttentionMetadata,
        cos_sin: torch.Tensor,  # [max_position, head_dim]
    ) -> torch.Tensor:  # [num_tokens, hidden]
        ops = self.ops
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = ops.rms_norm(q.reshape(-1, self.head_dim), self.q_norm.weight, self.q_norm.eps)
            k = ops.rms_norm(k.reshape(-1, self.head_dim), self.k_norm.weight, self.k_norm.eps)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = ops.rotary_embedding(positions, q, k, cos_sin)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        ops.reshape_and_cache(k, v, k_cache, v_cache, md.slot_mapping)
        nd = md.num_decode_seqs
        if nd == md.num_seqs:
            out = ops.paged_attention_decode(q, k_cache, v_cache, md.block_tables, md.seq_lens, self.scale)
        elif nd == 0:
            out = ops.paged_attention_prefill(
                q, k_cache, v_cache, md.block_tables, md.query_start_loc, md.seq_lens, self.scale
            )
        else:
            out = torch.empty_like(q)
            out[:nd] = ops.paged_attention_decode(
                q[:nd], k_cache, v_cache, md.block_tables[:nd], md.seq_lens[:nd], self.scale
            )
            out[nd:] = ops.paged_attention_prefill(
                q[nd:], k_cache, v_cache, md.block_tables[nd:], md.query_start_loc[nd:] - nd,
                md.seq_lens[nd:], self.scale,
            )
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up projections merged."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden] -> same
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType):
        super().__init__()
        self.ops = ops
        self.self_attn = Attention(cfg, ops)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, kv_cache, md, cos_sin):
        """``x``: the previous layer's output (or the embeddings, with ``residual`` None)."""
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual = x
            x = self.ops.rms_norm(x, ln1.weight, ln1.eps)
        else:
            x, residual = self.ops.fused_add_rms_norm(x, residual, ln1.weight, ln1.eps)
        x = self.self_attn(positions, x, kv_cache, md, cos_sin)
        x, residual = self.ops.fused_add_rms_norm(x, residual, ln2.weight, ln2.eps)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType):
        super().__init__()
        self.ops = ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Checkpoint-compatible names (``model.layers.N...``, ``lm_head``) with merged projections."""

    # (our parameter fragment, checkpoint fragment, shard id)
    stacked_params = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, cfg: ModelConfig, ops: ModuleType, max_position: int):
        super().__init__()
        self.config = cfg
        self.ops = ops
        self.model = DecoderModel(cfg, ops)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("cos_sin_cache", cos_sin_cache(cfg.rope, cfg.head_dim, max_position), persistent=False)

    def shard_slice(self, param_name: str, shard_id) -> slice:
        """Rows of a merged parameter that a checkpoint tensor fills."""
        cfg = self.config
        if "qkv_proj" in param_name:
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            start = {"q": 0, "k": q, "v": q + kv}[shard_id]
            return slice(start, start + (q if shard_id == "q" else kv))
        size = cfg.intermediate_size
        return slice(shard_id * size, (shard_id + 1) * size)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = self.model.embed_tokens(input_ids)  # [num_tokens, hidden]
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(positions, x, residual, kv_cache[i], md, self.cos_sin_cache)
        norm = self.model.norm
        x, _ = self.ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        return self.lm_head(hidden).float()
