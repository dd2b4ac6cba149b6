"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (per-head q/k RMSNorm).

Pre-norm decoder layers: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with SwiGLU; q/k/v and
gate/up are one matmul each. Sliding windows (Mistral, Qwen2 with ``use_sliding_window``) come per
layer from the config.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import torch
from torch import nn

from pageant.engine.adapters.spec import LLAMA_LORA, LoRAModelSpec
from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig, common_fields
from pageant.engine.layers.activation import ActAndMul
from pageant.engine.layers.attention import Attention
from pageant.engine.layers.layernorm import RMSNorm
from pageant.engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pageant.engine.layers.parallel import SINGLE, ParallelState, PPMissingLayer
from pageant.engine.layers.rotary import RotaryEmbedding
from pageant.engine.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pageant.engine.models.base import CausalLM
from pageant.engine.models.registry import architecture_of


def layer_windows(hf: dict[str, Any], window: int | None) -> tuple[int | None, ...]:
    """Each layer's sliding window from ``layer_types`` (transformers 5), else ``window`` everywhere."""
    types = hf.get("layer_types")
    if window is None or not types:
        return (window,) * hf["num_hidden_layers"]
    return tuple(window if t == "sliding_attention" else None for t in types)


def config_from_hf(hf: dict[str, Any], family: str = "llama") -> ModelConfig:
    arch = architecture_of(hf)
    qwen2, qwen3 = arch == "Qwen2ForCausalLM", arch == "Qwen3ForCausalLM"
    window = hf.get("sliding_window")
    if (qwen2 or qwen3) and not hf.get("use_sliding_window", False):
        window = None
    if arch == "LlamaForCausalLM":
        window = None
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**common_fields(
        hf, family, qkv_bias=bias or qwen2, o_bias=bias and not qwen2, mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=qwen3, layer_sliding_windows=layer_windows(hf, window),
    ))


class LlamaAttention(nn.Module):
    """q/k/v in one matmul, optional per-head q/k norm, rotary, paged attention, o_proj. The scale,
    window and soft cap come from the config (Gemma 2 reuses this class)."""

    def __init__(self, cfg: ModelConfig, layer: int, ops: ModuleType, rotary: RotaryEmbedding,
                 parallel: ParallelState):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.qkv_bias, parallel=parallel)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias,
                                        parallel=parallel)
        qkv = self.qkv_proj
        self.q_size, self.kv_size, self.head_dim = qkv.q_size, qkv.kv_size, cfg.head_dim
        self.rotary_emb = rotary
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.attn = Attention(qkv.num_heads, cfg.head_dim, scale, qkv.num_kv_heads, ops,
                              sliding_window=cfg.layer_sliding_windows[layer],
                              logits_soft_cap=cfg.attn_logit_softcapping)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:  # [num_tokens, hidden] -> same
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # per-head RMSNorm (Qwen3)
            q, k = self.q_norm(q.reshape(-1, self.head_dim)), self.k_norm(k.reshape(-1, self.head_dim))
        q, k = self.rotary_emb(positions, q.reshape(n, -1, self.head_dim), k.reshape(n, -1, self.head_dim))
        return self.o_proj(self.attn(q.reshape(n, -1), k.reshape(n, -1), v, kv_cache, md))


class LlamaMLP(nn.Module):
    """Gated MLP ``down(act(gate(x)) * up(x))`` with gate and up merged (SwiGLU; GeGLU for Gemma)."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelState):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2,
                                                       bias=cfg.mlp_bias, parallel=parallel)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias,
                                           parallel=parallel)
        self.act_fn = ActAndMul(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden] -> same
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention then ``mlp`` (a ``LlamaMLP``, or Mixtral's sparse MoE block)."""

    def __init__(self, cfg: ModelConfig, layer: int, ops: ModuleType, rotary: RotaryEmbedding,
                 parallel: ParallelState, mlp: nn.Module):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer, ops, rotary, parallel)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)

    def forward(self, positions, x, residual, kv_cache, md):
        """``x``: the previous layer's output (or the embeddings, with ``residual`` None)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, md)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    """Embedding, the decoder layers, final norm; under pipeline parallelism only this stage's share
    (the others are ``PPMissingLayer``) and ``forward`` takes/returns the stream between stages."""

    def __init__(self, cfg: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState,
                 make_mlp: Callable[[], nn.Module]):
        super().__init__()
        self.parallel = parallel
        self.start_layer, self.end_layer = parallel.layer_range(cfg.num_layers)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel=parallel)
                             if parallel.is_first_stage else PPMissingLayer())
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rotary_dim or cfg.head_dim, max_position, cfg.rope, ops,
                                 max_position_embeddings=cfg.max_position_embeddings)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, ops, rotary, parallel, make_mlp()) if self.start_layer <= i < self.end_layer
            else PPMissingLayer() for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops) if parallel.is_last_stage else PPMissingLayer()

    def forward(self, input_ids, positions, kv_cache, md, intermediate: dict | None = None):
        """``kv_cache[j]`` is this stage's layer ``start_layer + j``. Returns the final hidden states
        ``[num_tokens, hidden]`` on the last stage, else ``{"hidden", "residual"}`` for the next."""
        if self.parallel.is_first_stage:
            x, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden]
        else:
            x, residual = intermediate["hidden"], intermediate["residual"]
        for i in range(self.start_layer, self.end_layer):
            x, residual = self.layers[i](positions, x, residual, kv_cache[i - self.start_layer], md)
        if not self.parallel.is_last_stage:
            return {"hidden": x, "residual": residual}
        return self.norm(x, residual)[0]


class LlamaForCausalLM(CausalLM):
    """Checkpoint names ``model.layers.N...`` and ``lm_head``, projections merged on load."""

    supports_pp = True
    stacked = (
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        super().__init__(config, ops, max_position, parallel)
        self.model = LlamaModel(config, ops, max_position, parallel, self.make_mlp)
        self.lm_head = (ParallelLMHead(config.vocab_size, config.hidden_size, parallel=parallel)
                        if parallel.is_last_stage else PPMissingLayer())
        self.tie_weights()

    def make_mlp(self) -> nn.Module:
        """One layer's feed-forward block (Mixtral overrides it with its MoE)."""
        return LlamaMLP(self.config, self.parallel)

    def forward(self, input_ids: torch.Tensor,  # [num_tokens] int64
                positions: torch.Tensor,  # [num_tokens] int64
                kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
                md: AttentionMetadata, intermediate: dict | None = None) -> torch.Tensor:  # [num_tokens, hidden]
        return self.model(input_ids, positions, kv_cache, md, intermediate)

    @staticmethod
    def lora_spec(cfg: ModelConfig) -> LoRAModelSpec:
        return LoRAModelSpec.for_layout(LLAMA_LORA, cfg)
