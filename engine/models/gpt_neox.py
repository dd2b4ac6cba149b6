"""GPT-NeoX / Pythia: parallel residual, partial rotary, LayerNorm with bias, per-head fused qkv.

A layer computes ``x + attn(ln1(x)) + mlp(ln2(x))`` (``use_parallel_residual``) or the sequential
form. The checkpoint's ``query_key_value`` rows are laid out per head (``[head][q, k, v][head_dim]``);
they are re-laid as ``[q | k | v]`` on load (and so are LoRA B rows, via the layout's ``row_order``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from pageant.engine.adapters.spec import LoRALayout, LoRAModelSpec
from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig, common_fields, partial_rotary_factor
from pageant.engine.layers.activation import get_act_fn
from pageant.engine.layers.attention import Attention
from pageant.engine.layers.layernorm import LayerNorm
from pageant.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pageant.engine.layers.parallel import SINGLE, ParallelState
from pageant.engine.layers.rotary import RotaryEmbedding
from pageant.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pageant.engine.models.base import CausalLM
from pageant.engine.models.utils import per_head_to_blocks


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hf = dict(hf)
    hf.setdefault("rope_theta", hf.get("rotary_emb_base", 10000.0))  # older configs' names
    if "rotary_pct" in hf and not (hf.get("rope_parameters") or {}).get("partial_rotary_factor"):
        hf["partial_rotary_factor"] = hf["rotary_pct"]
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", True))
    return ModelConfig(**common_fields(
        hf, "gpt_neox", num_kv_heads=hf["num_attention_heads"], head_dim=head_dim,
        rotary_dim=int(head_dim * partial_rotary_factor(hf)), rms_norm_eps=hf.get("layer_norm_eps", 1e-5),
        hidden_act=hf.get("hidden_act", "gelu"), qkv_bias=bias, o_bias=bias, mlp_bias=True,
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
    ))


def _qkv_order(num_heads: int, head_dim: int) -> torch.Tensor:  # [3 * num_heads * head_dim] int64
    """Checkpoint row of each of our ``[q | k | v]`` rows."""
    return per_head_to_blocks(torch.arange(3 * num_heads * head_dim), num_heads, (1, 1, 1), head_dim)


class GPTNeoXAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, rotary: RotaryEmbedding, parallel: ParallelState):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.query_key_value = QKVParallelLinear(h, d, cfg.num_heads, cfg.num_heads, bias=cfg.qkv_bias,
                                                 parallel=parallel)
        self.dense = RowParallelLinear(h, h, bias=cfg.o_bias, parallel=parallel)
        self.rotary_emb, self.head_dim = rotary, d
        self.size = self.query_key_value.q_size
        n = self.query_key_value.num_heads
        self.attn = Attention(n, d, d**-0.5, n, ops)

    def forward(self, positions, x, kv_cache, md) -> torch.Tensor:  # [num_tokens, hidden] -> same
        n = x.shape[0]
        q, k, v = self.query_key_value(x).split([self.size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q.reshape(n, -1, self.head_dim), k.reshape(n, -1, self.head_dim))
        return self.dense(self.attn(q.reshape(n, -1), k.reshape(n, -1), v, kv_cache, md))


class GPTNeoXMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True, parallel=parallel)
        self.dense_4h_to_h = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=True, parallel=parallel)
        self.act = get_act_fn(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, rotary: RotaryEmbedding, parallel: ParallelState):
        super().__init__()
        self.use_parallel_residual = cfg.parallel_residual
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = GPTNeoXAttention(cfg, ops, rotary, parallel)
        self.mlp = GPTNeoXMLP(cfg, parallel)

    def forward(self, positions, x, kv_cache, md) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(x), kv_cache, md)
        if self.use_parallel_residual:  # the same sums, in the same order, as transformers
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        attn = attn + x
        return self.mlp(self.post_attention_layernorm(attn)) + attn


class GPTNeoXModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel=parallel)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_dim or cfg.head_dim, max_position, cfg.rope, ops,
                                 max_position_embeddings=cfg.max_position_embeddings)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, ops, rotary, parallel) for _ in range(cfg.num_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_cache, md) -> torch.Tensor:
        x = self.embed_in(input_ids)  # [num_tokens, hidden]
        for i, layer in enumerate(self.layers):
            x = layer(positions, x, kv_cache[i], md)
        return self.final_layer_norm(x)


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h)}


NEOX_LORA = LoRALayout(
    layer_prefix="gpt_neox.layers",
    parents=(("query_key_value", "attention"), ("dense", "attention"), ("dense_h_to_4h", "mlp"),
             ("dense_4h_to_h", "mlp")),
    groups=tuple((p, (p,)) for p in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    attrs=(("query_key_value", ("attention", "query_key_value")), ("dense", ("attention", "dense")),
           ("dense_h_to_4h", ("mlp", "dense_h_to_4h")), ("dense_4h_to_h", ("mlp", "dense_4h_to_h"))),
    shapes=_shapes,
    row_order=lambda proj, cfg: _qkv_order(cfg.num_heads, cfg.head_dim).tolist() if proj == "query_key_value" else None,
)


class GPTNeoXForCausalLM(CausalLM):
    """Checkpoint names ``gpt_neox.layers.N...`` and ``embed_out`` (untied)."""

    lm_head_name = "embed_out"

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        super().__init__(config, ops, max_position, parallel)
        self.gpt_neox = GPTNeoXModel(config, ops, max_position, parallel)
        self.embed_out = ParallelLMHead(config.vocab_size, config.hidden_size, parallel=parallel)
        self.tie_weights()

    def embedding(self) -> nn.Module:
        return self.gpt_neox.embed_in

    def decoder_layers(self) -> nn.ModuleList:
        return self.gpt_neox.layers

    def rename(self, name: str, tensor: torch.Tensor):
        if ".attention.query_key_value." in name:  # [head][q, k, v][d] -> [q | k | v]
            cfg = self.config
            return name, per_head_to_blocks(tensor, cfg.num_heads, (1, 1, 1), cfg.head_dim)
        return name, tensor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:  # [num_tokens] ids -> [num_tokens, hidden]
        return self.gpt_neox(input_ids, positions, kv_cache, md)

    @staticmethod
    def lora_spec(cfg: ModelConfig) -> LoRAModelSpec:
        return LoRAModelSpec.for_layout(NEOX_LORA, cfg)
