"""What every causal-LM family shares: tied heads, logits, weight loading, buffers after a meta build."""

from __future__ import annotations

from types import ModuleType
from typing import Iterable

import torch
from torch import nn

from pageant.engine.config import ModelConfig
from pageant.engine.layers.parallel import SINGLE, ParallelState
from pageant.engine.models.utils import SKIP, Stacked, expected_keys, load_stacked


class CausalLM(nn.Module):
    """Base of the family model classes.

    Subclasses build ``self.<lm_head_name>`` (a ``ParallelLMHead``) and say which module is the
    token embedding (``embedding()``); ``stacked`` maps checkpoint projections onto merged
    parameters and ``rename`` re-lays anything else. ``final_logit_softcapping`` applies here.
    """

    stacked: Stacked = ()
    lm_head_name = "lm_head"

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        super().__init__()
        self.config, self.ops, self.max_position, self.parallel = config, ops, max_position, parallel

    def embedding(self) -> nn.Module:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, in order (LoRA wraps their projections)."""
        return self.model.layers

    def tie_weights(self) -> None:
        """Share the embedding's weight with the head when the checkpoint ties them (call after any
        ``to_empty``, which un-ties parameters)."""
        if self.config.tie_word_embeddings:
            getattr(self, self.lm_head_name).tie_weights(self.embedding())

    def init_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent tables (rotary cos/sin) on ``device`` after a meta build."""
        for module in self.modules():
            if module is not self and hasattr(module, "init_buffers"):
                module.init_buffers(device)

    def rename(self, name: str, tensor: torch.Tensor):
        """A checkpoint name/tensor in our naming and layout, or ``SKIP`` (default: unchanged)."""
        return name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        head = f"{self.lm_head_name}.weight"

        def rename(name: str, tensor: torch.Tensor):
            if self.config.tie_word_embeddings and name == head:
                return SKIP
            return self.rename(name, tensor)

        return load_stacked(self, weights, self.stacked, rename)

    def expected_keys(self) -> set[str]:
        return expected_keys(self)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        logits = getattr(self, self.lm_head_name)(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
