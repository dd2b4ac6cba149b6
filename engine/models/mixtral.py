"""Mixtral: the Llama decoder with a sparse mixture-of-experts MLP.

Each layer's MLP routes every token to ``num_experts_per_tok`` of ``num_local_experts`` SwiGLU
experts (softmax router, top-k renormalised) and sums their outputs weighted by the router; the
experts are one fused weight run by the grouped-GEMM kernel (``pageant.engine.layers.moe``).
Checkpoints store experts one by one (``block_sparse_moe.experts.E.w1/w2/w3``, as on the Hub and
as transformers saves them) or fused (transformers 5's in-memory ``mlp.experts.gate_up_proj``);
both load. LoRA targets the attention projections.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pageant.engine.adapters.spec import LLAMA_LORA, LoRALayout, LoRAModelSpec
from pageant.engine.config import ModelConfig, common_fields
from pageant.engine.layers.linear import ReplicatedLinear
from pageant.engine.layers.moe import FusedMoE
from pageant.engine.layers.parallel import ParallelState
from pageant.engine.models.llama import LlamaForCausalLM, layer_windows

_EXPERT = re.compile(r"^(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**common_fields(
        hf, "mixtral", num_experts=hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
        layer_sliding_windows=layer_windows(hf, hf.get("sliding_window")),
    ))


class MixtralMoE(nn.Module):
    """Router (``gate``: ``[num_experts, hidden]``) plus the fused experts."""

    def __init__(self, cfg: ModelConfig, ops: ModuleType, parallel: ParallelState):
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = FusedMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size,
                                ops, renormalize=True, tp_size=parallel.tp_size,
                                parallel=parallel if parallel.tp_size > 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden] -> same
        return self.experts(x, self.gate(x))  # router logits [num_tokens, num_experts]


MIXTRAL_LORA = LoRALayout(
    layer_prefix="model.layers",
    parents=LLAMA_LORA.parents[:4],
    groups=LLAMA_LORA.groups[:2],
    attrs=LLAMA_LORA.attrs[:2],
    shapes=lambda cfg: {p: s for p, s in LLAMA_LORA.shapes(cfg).items() if p in ("q_proj", "k_proj", "v_proj", "o_proj")},
)


class MixtralForCausalLM(LlamaForCausalLM):
    """Checkpoint names ``model.layers.N.block_sparse_moe.{gate, experts.E.w1|w2|w3}`` (or fused
    ``mlp.experts.*``); ours are ``model.layers.N.mlp.{gate, experts}``."""

    stacked = LlamaForCausalLM.stacked[:3]  # q/k/v; the experts are renamed below

    def make_mlp(self) -> nn.Module:
        return MixtralMoE(self.config, self.ops, self.parallel)

    def rename(self, name: str, tensor: torch.Tensor):
        if m := _EXPERT.match(name):  # one expert's gate (w1), down (w2) or up (w3) projection
            param = "w2_weight" if m[3] == "w2" else "w13_weight"
            return f"{m[1]}.mlp.experts.{param}", tensor, (int(m[2]), m[3])
        if m := _FUSED.match(name):  # all experts at once; the loader infers "w13" / "w2" from the parameter
            param = "w13_weight" if m[2] == "gate_up_proj" else "w2_weight"
            return f"{m[1]}.mlp.experts.{param}", tensor
        return name.replace(".block_sparse_moe.gate.", ".mlp.gate."), tensor

    @staticmethod
    def lora_spec(cfg: ModelConfig) -> LoRAModelSpec:
        return LoRAModelSpec.for_layout(MIXTRAL_LORA, cfg)
