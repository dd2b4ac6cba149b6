"""LoRA-aware projections: the base ``nn.Linear`` plus the manager's batched delta.

``wrap_model`` swaps the (possibly fused) projections of every decoder layer of a loaded
model (where the spec's ``attrs`` say they are) for ``LoRALinear`` wrappers; the model code itself is unchanged. Wrap after
the weights are loaded (parameter names change to ``...base_layer.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from pageant.engine.adapters.manager import LoRAManager


class LoRALinear(nn.Module):
    """``base(x)`` plus, for every token with an adapter, ``x @ A.T @ B.T`` (scaling folded into B)."""

    def __init__(self, base_layer: nn.Module, manager: LoRAManager, layer: int, group: str):
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
    """Wrap every LoRA-capable projection of the model's decoder layers (in place); returns ``model``."""
    attrs = dict(manager.spec.attrs)
    for i, layer in enumerate(model.decoder_layers()):
        for group, _ in manager.spec.groups:
            parent_name, attr = attrs[group]
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                continue
            setattr(parent, attr, LoRALinear(base, manager, i, group))
    return model
