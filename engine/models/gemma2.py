"""Gemma 2: alternating sliding-window and global layers, logit soft-capping, GeGLU, ``(1 + w)`` norms.

Differences from the Llama decoder (whose attention and MLP it reuses): embeddings scaled by
``sqrt(hidden)``; norms after attention and around the MLP (pre- and post-feed-forward); attention
scale ``query_pre_attn_scalar ** -0.5`` and ``attn_logit_softcapping``; ``final_logit_softcapping``
on the logits; tied embeddings. ``layer_types`` (else even layers sliding) picks each layer's window.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from pageant.engine.adapters.spec import LLAMA_LORA, LoRAModelSpec
from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig, common_fields
from pageant.engine.layers.layernorm import GemmaRMSNorm
from pageant.engine.layers.parallel import SINGLE, ParallelState
from pageant.engine.layers.rotary import RotaryEmbedding
from pageant.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pageant.engine.models.base import CausalLM
from pageant.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    window, layers = hf.get("sliding_window"), hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return ModelConfig(**common_fields(
        hf, "gemma2", hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        layer_sliding_windows=tuple(window if t == "sliding_attention" else None for t in types),
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
    ))


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ops: ModuleType, rotary: RotaryEmbedding,
                 parallel: ParallelState):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = LlamaAttention(cfg, layer, ops, rotary, parallel)
        self.mlp = LlamaMLP(cfg, parallel)
        self.input_layernorm, self.post_attention_layernorm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)

    def forward(self, positions, x, kv_cache, md) -> torch.Tensor:  # [num_tokens, hidden] -> same
        x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x), kv_cache, md))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel=parallel)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_dim or cfg.head_dim, max_position, cfg.rope, ops,
                                 max_position_embeddings=cfg.max_position_embeddings)
        self.layers = nn.ModuleList(Gemma2DecoderLayer(cfg, i, ops, rotary, parallel) for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_cache, md) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        x = x * torch.tensor(self.hidden_size**0.5, dtype=x.dtype)  # the normalizer, rounded to the dtype as HF does
        for i, layer in enumerate(self.layers):
            x = layer(positions, x, kv_cache[i], md)
        return self.norm(x)


class Gemma2ForCausalLM(CausalLM):
    """Checkpoint names as Llama's (``model.layers.N...``); the head is the tied embedding."""

    stacked = LlamaForCausalLM.stacked

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        super().__init__(config, ops, max_position, parallel)
        self.model = Gemma2Model(config, ops, max_position, parallel)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, parallel=parallel)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:  # [num_tokens] ids -> [num_tokens, hidden]
        return self.model(input_ids, positions, kv_cache, md)

    @staticmethod
    def lora_spec(cfg: ModelConfig) -> LoRAModelSpec:
        return LoRAModelSpec.for_layout(LLAMA_LORA, cfg)
