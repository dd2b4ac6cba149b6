"""What every causal-LM family shares: tied heads, logits, weight loading, buffers after a meta build."""

from __future__ import annotations

from types import ModuleType
from typing import Iterable

import torch
from torch import nn

from pageant.engine.config import ModelConfig
from pageant.engine.layers.parallel import SINGLE, ParallelState, PPMissingLayer
from pageant.engine.models.utils import SKIP, Stacked, expected_keys, load_stacked


class CausalLM(nn.Module):
    """Base of the family model classes.

    Subclasses build ``self.<lm_head_name>`` (a ``ParallelLMHead``) and say which module is the
    token embedding (``embedding()``); ``stacked`` maps checkpoint projections onto merged
    parameters and ``rename`` re-lays anything else. ``final_logit_softcapping`` applies here.
    """

    stacked: Stacked = ()
    lm_head_name = "lm_head"
    supports_pp = False  # the family splits its layers over pipeline stages (``intermediate`` in forward)
    intermediate_keys = ("hidden", "residual")  # what one stage hands the next, each [num_tokens, hidden]

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        super().__init__()
        if parallel.pp_size > 1 and not self.supports_pp:
            raise ValueError(f"pipeline parallelism is not supported for {config.architecture} yet "
                             "(supported: the Llama family, Mistral, Qwen2/3, Mixtral, Phi-3)")
        self.config, self.ops, self.max_position, self.parallel = config, ops, max_position, parallel

    def embedding(self) -> nn.Module:
        return self.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, in order (LoRA wraps their projections)."""
        return self.model.layers

    def tie_weights(self) -> None:
        """Share the embedding's weight with the head when the checkpoint ties them (call after any
        ``to_empty``, which un-ties parameters)."""
        head, embedding = getattr(self, self.lm_head_name), self.embedding()
        if self.config.tie_word_embeddings and not isinstance(head, PPMissingLayer) \
                and not isinstance(embedding, PPMissingLayer):
            head.tie_weights(embedding)

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
        embedding = self.embedding()
        # a last pipeline stage without the embedding reads a tied head from the embedding's tensor
        head_from_embedding = (self.config.tie_word_embeddings and isinstance(embedding, PPMissingLayer)
                               and not isinstance(getattr(self, self.lm_head_name), PPMissingLayer))
        embedding_weight = next(n for n, m in self.named_modules() if m is embedding) + ".weight"

        def rename(name: str, tensor: torch.Tensor):
            if head_from_embedding and name == embedding_weight:
                return head, tensor
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
