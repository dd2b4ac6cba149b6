"""Attention metadata for one step (built by the model runner, read by every attention layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each sequence attends to.

    Decode sequences come first: the first ``num_decode_seqs`` sequences have exactly one query
    token each, so ``query_start_loc[:num_decode_seqs + 1] == arange(num_decode_seqs + 1)``.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64 (-1 = padding, not written)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32
    num_decode_seqs: int
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
