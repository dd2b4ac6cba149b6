"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama decoder with ``qkv_proj`` and ``gate_up_proj`` already
fused in the checkpoint, longrope ("su") rope scaling with short/long factors, and optional
partial rotary (``partial_rotary_factor``) and sliding window.

The fused checkpoint tensors load whole (``weight_loader`` with no shard splits them), and LoRA
targets the fused projections as PEFT names them.
"""

from __future__ import annotations

from typing import Any

from pageant.engine.adapters.spec import LLAMA_LORA, LoRALayout, LoRAModelSpec
from pageant.engine.config import ModelConfig
from pageant.engine.models import llama


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return llama.config_from_hf(hf, "phi3")  # Llama's fields; sliding_window and rope come from the config


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}


PHI3_LORA = LoRALayout(
    layer_prefix="model.layers",
    parents=(("qkv_proj", "self_attn"), ("o_proj", "self_attn"), ("gate_up_proj", "mlp"), ("down_proj", "mlp")),
    groups=tuple((p, (p,)) for p in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    attrs=LLAMA_LORA.attrs,
    shapes=_shapes,
)


class Phi3ForCausalLM(llama.LlamaForCausalLM):
    """Checkpoint names as Llama's, with the projections fused on disk."""

    stacked = ()

    @staticmethod
    def lora_spec(cfg: ModelConfig) -> LoRAModelSpec:
        return LoRAModelSpec.for_layout(PHI3_LORA, cfg)
