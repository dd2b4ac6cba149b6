"""LoRA-aware projections: the base ``nn.Linear`` plus the manager's batched delta.

``wrap_model`` swaps the four (possibly fused) projections of every decoder layer of a loaded
Llama-family model for ``LoRALinear`` wrappers; the model code itself is unchanged. Wrap after
the weights are loaded (parameter names change to ``...base_layer.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from pageant.engine.adapters.manager import LoRAManager

# fused group name -> attribute path inside a decoder layer
GROUP_ATTRS = {
    "qkv_proj": ("self_attn", "qkv_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_up_proj": ("mlp", "gate_up_proj"),
    "down_proj": ("mlp", "down_proj"),
}


class LoRALinear(nn.Module):
    """``base(x)`` plus, for every token with an adapter, ``x @ A.T @ B.T`` (scaling folded into B)."""

    def __init__(self, base_layer: nn.Linear, manager: LoRAManager, layer: int, group: str):
        super().__init__()
        self.base_layer = base_layer
        self.manager = manager
        self.layer = layer
        self.group = group

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        out = self.base_layer(x)
        return self.manager.apply(self.layer, self.group, x, out)


def wrap_model(model: nn.Module, manager: LoRAManager) -> nn.Module:
    """Wrap every LoRA-capable projection of ``model.model.layers`` (in place); returns ``model``."""
    for i, layer in enumerate(model.model.layers):
        for group, _ in manager.spec.groups:
            parent_name, attr = GROUP_ATTRS[group]
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                continue
            setattr(parent, attr, LoRALinear(base, manager, i, group))
    return model
