"""LoRA-aware projections: the base ``nn.Linear`` plus the manager's batched delta.

``wrap_model`` swaps the (possibly fused) projections of every decoder layer of a loaded
model (where the spec's ``attrs`` say they are) for ``LoRALinear`` wrappers; the model code itself is unchanged. Wrap after
the weights are loaded (parameter names change to ``...base_layer.weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from pageant.engine.adapters.manager import LoRAManager
from pageant.engine.adapters.sharding import group_shard
from pageant.engine.layers.linear import RowParallelLinear
from pageant.engine.layers.parallel import PPMissingLayer


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
        base = self.base_layer
        if isinstance(base, RowParallelLinear) and base.parallel.tp_size > 1:
            # this rank's partial sums, base and delta alike, then the layer's one all-reduce
            partial = base.quant_method.apply(base, x, None)  # [num_tokens, out], partial
            out = base.parallel.all_reduce(self.manager.apply(self.layer, self.group, x, partial))
            return out if base.bias is None else out + base.bias
        return self.manager.apply(self.layer, self.group, x, base(x))


def wrap_model(model: nn.Module, manager: LoRAManager) -> nn.Module:
    """Wrap every LoRA-capable projection of the model's decoder layers (in place); returns ``model``."""
    attrs = dict(manager.spec.attrs)
    local = [(i, layer) for i, layer in enumerate(model.decoder_layers()) if not isinstance(layer, PPMissingLayer)]
    if local:  # tensor parallelism: the manager keeps this rank's share of every adapter
        shards = {}
        for group, projs in manager.spec.groups:
            parent_name, attr = attrs[group]
            base = getattr(getattr(local[0][1], parent_name), attr)
            shard = group_shard(base.base_layer if isinstance(base, LoRALinear) else base, len(projs))
            if shard is not None:
                shards[group] = shard
        if shards:
            manager.set_sharding(shards)
    for i, layer in local:
        for group, _ in manager.spec.groups:
            parent_name, attr = attrs[group]
            parent = getattr(layer, parent_name)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                continue
            setattr(parent, attr, LoRALinear(base, manager, i, group))
    return model
