"""Falcon (7B / 40B / 180B): parallel attention + MLP, multi-query or grouped KV heads, LayerNorm.

Three fused-qkv layouts, all re-laid as ``[q | k | v]`` on load (and for LoRA B rows):

- new decoder architecture (40B/180B): per KV head, its query heads then one k and one v head;
- multi-query (7B): all query heads, then the one k head, then the one v head (already in order);
- neither (RW-style multi-head): per head q, k, v, as GPT-NeoX.

A layer is ``x + mlp(ln_mlp(x)) + attn(ln_attn(x))`` (two norms, new architecture), the same with
one shared norm (7B), or sequential. ALiBi checkpoints are refused.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from pageant.engine.adapters.spec import LoRALayout, LoRAModelSpec
from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig, common_fields
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
    for ours, old in (("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer"), ("num_kv_heads", "n_head_kv")):
        if ours not in hf and old in hf:  # the original Falcon configs' names
            hf[ours] = hf[old]
    if hf.get("alibi"):
        raise ValueError("Falcon checkpoints with alibi=true are not supported (rotary Falcon models only)")
    heads, new_arch = hf["num_attention_heads"], bool(hf.get("new_decoder_architecture", False))
    multi_query = bool(hf.get("multi_query", True))
    kv_heads = hf.get("num_kv_heads") or heads if (new_arch or not multi_query) else 1
    parallel_attn = bool(hf.get("parallel_attn", True))
    num_ln = hf.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    bias = bool(hf.get("bias", False))
    layout = "grouped" if new_arch else ("multi_query" if multi_query else "per_head")
    return ModelConfig(**common_fields(
        hf, "falcon", num_kv_heads=kv_heads, head_dim=hf["hidden_size"] // heads,
        intermediate_size=hf.get("ffn_hidden_size") or 4 * hf["hidden_size"],
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5), hidden_act=hf.get("activation", "gelu"),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        parallel_residual=parallel_attn or new_arch,
        family_options=(("qkv_layout", layout), ("num_ln_in_parallel_attn", num_ln if parallel_attn or new_arch else 0)),
    ))


def relay_qkv(tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The checkpoint's fused qkv rows (weight or bias) as ``[q | k | v]``."""
    layout, d = cfg.option("qkv_layout"), cfg.head_dim
    if layout == "grouped":
        return per_head_to_blocks(tensor, cfg.num_kv_heads, (cfg.num_heads // cfg.num_kv_heads, 1, 1), d)
    if layout == "per_head":
        return per_head_to_blocks(tensor, cfg.num_heads, (1, 1, 1), d)
    return tensor


class FalconAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, rotary: RotaryEmbedding, parallel: ParallelState):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.query_key_value = QKVParallelLinear(h, d, cfg.num_heads, cfg.num_kv_heads, bias=cfg.qkv_bias,
                                                 parallel=parallel)
        self.dense = RowParallelLinear(h, h, bias=cfg.o_bias, parallel=parallel)
        qkv = self.query_key_value
        self.q_size, self.kv_size, self.head_dim, self.rotary_emb = qkv.q_size, qkv.kv_size, d, rotary
        self.attn = Attention(qkv.num_heads, d, d**-0.5, qkv.num_kv_heads, ops)

    def forward(self, positions, x, kv_cache, md) -> torch.Tensor:  # [num_tokens, hidden] -> same
        n = x.shape[0]
        q, k, v = self.query_key_value(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q.reshape(n, -1, self.head_dim), k.reshape(n, -1, self.head_dim))
        return self.dense(self.attn(q.reshape(n, -1), k.reshape(n, -1), v, kv_cache, md))


class FalconMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelState):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias,
                                                  parallel=parallel)
        self.dense_4h_to_h = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias,
                                               parallel=parallel)
        self.act = get_act_fn(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, rotary: RotaryEmbedding, parallel: ParallelState):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.num_ln = cfg.option("num_ln_in_parallel_attn")  # 2: ln_attn + ln_mlp; 1: one shared; 0: sequential
        if self.num_ln == 2:
            self.ln_attn, self.ln_mlp = LayerNorm(h, eps), LayerNorm(h, eps)
        else:
            self.input_layernorm = LayerNorm(h, eps)
            if self.num_ln == 0:
                self.post_attention_layernorm = LayerNorm(h, eps)
        self.self_attention = FalconAttention(cfg, ops, rotary, parallel)
        self.mlp = FalconMLP(cfg, parallel)

    def forward(self, positions, x, kv_cache, md) -> torch.Tensor:
        if self.num_ln == 2:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn = self.self_attention(positions, attn_in, kv_cache, md)
        if self.num_ln == 0:
            residual = attn + x
            return self.mlp(self.post_attention_layernorm(residual)) + residual
        return (self.mlp(mlp_in) + attn) + x  # transformers' order of the sums


class FalconModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState):
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel=parallel)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.head_dim, max_position, cfg.rope, ops,
                                 max_position_embeddings=cfg.max_position_embeddings)
        self.h = nn.ModuleList(FalconDecoderLayer(cfg, ops, rotary, parallel) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_cache, md) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # [num_tokens, hidden]
        for i, layer in enumerate(self.h):
            x = layer(positions, x, kv_cache[i], md)
        return self.ln_f(x)


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    return {"query_key_value": (h, qkv), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h)}


def _row_order(proj: str, cfg: ModelConfig) -> list[int] | None:
    if proj != "query_key_value" or cfg.option("qkv_layout") == "multi_query":
        return None
    return relay_qkv(torch.arange(_shapes(cfg)["query_key_value"][1]), cfg).tolist()


FALCON_LORA = LoRALayout(
    layer_prefix="transformer.h",
    parents=(("query_key_value", "self_attention"), ("dense", "self_attention"), ("dense_h_to_4h", "mlp"),
             ("dense_4h_to_h", "mlp")),
    groups=tuple((p, (p,)) for p in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    attrs=(("query_key_value", ("self_attention", "query_key_value")), ("dense", ("self_attention", "dense")),
           ("dense_h_to_4h", ("mlp", "dense_h_to_4h")), ("dense_4h_to_h", ("mlp", "dense_4h_to_h"))),
    shapes=_shapes,
    row_order=_row_order,
)


class FalconForCausalLM(CausalLM):
    """Checkpoint names ``transformer.h.N...``; ``lm_head`` tied to the embeddings unless the config says not."""

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        super().__init__(config, ops, max_position, parallel)
        self.transformer = FalconModel(config, ops, max_position, parallel)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel=parallel)
        self.tie_weights()

    def embedding(self) -> nn.Module:
        return self.transformer.word_embeddings

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def rename(self, name: str, tensor: torch.Tensor):
        if ".self_attention.query_key_value." in name:
            return name, relay_qkv(tensor, self.config)
        return name, tensor

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:  # [num_tokens] ids -> [num_tokens, hidden]
        return self.transformer(input_ids, positions, kv_cache, md)

    @staticmethod
    def lora_spec(cfg: ModelConfig) -> LoRAModelSpec:
        return LoRAModelSpec.for_layout(FALCON_LORA, cfg)
