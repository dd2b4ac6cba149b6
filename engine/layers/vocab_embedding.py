"""Token embeddings and the LM head, split across ranks by vocabulary rows.

Rank ``r`` of ``tp_size`` holds rows ``[r * n, (r + 1) * n)`` of the vocabulary padded up to a
multiple of ``tp_size`` (``n = padded_vocab // tp_size``). The embedding zeroes the rows of ids
outside its shard and all-reduces; the LM head computes its shard's logits and all-gathers them.
On one rank both are a plain ``F.embedding`` / ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.layers.parallel import SINGLE, ParallelState


class VocabParallelEmbedding(nn.Module):
    """``[num_tokens] int64 -> [num_tokens, embedding_dim]`` over this rank's vocabulary rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, parallel: ParallelState = SINGLE,
                 params_dtype: torch.dtype | None = None):
        super().__init__()
        tp = parallel.tp_size
        self.num_embeddings, self.embedding_dim, self.parallel = num_embeddings, embedding_dim, parallel
        padded = -(-num_embeddings // tp) * tp
        self.num_embeddings_per_partition = padded // tp
        self.vocab_start = parallel.tp_rank * self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype),
                                   requires_grad=False)

    shard_ids = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """This rank's vocabulary rows of the weight ``[vocab, dim]`` (or of the head's bias ``[vocab]``)."""
        if loaded.shape[0] != self.num_embeddings or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"shape {tuple(loaded.shape)} does not fit the vocabulary "
                             f"[{self.num_embeddings}, {self.embedding_dim}]")
        rows = loaded[self.vocab_start : self.vocab_start + self.num_embeddings_per_partition]
        param.data.zero_()
        param.data[: rows.shape[0]].copy_(rows.to(param.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, dim]
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings_per_partition)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states to logits ``[n, hidden] -> [n, vocab]``; ``tie_weights`` shares the embedding's."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bias: bool = False,
                 parallel: ParallelState = SINGLE, params_dtype: torch.dtype | None = None):
        super().__init__(num_embeddings, embedding_dim, parallel=parallel, params_dtype=params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition, dtype=params_dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)


    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Use the embedding's weight (``tie_word_embeddings``); the checkpoint's lm_head is not read."""
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab]
        logits = F.linear(hidden, self.weight, self.bias)  # [n, vocab / tp (padded)]
        logits = self.parallel.all_gather_last_dim(logits)
        return logits[:, : self.num_embeddings]
