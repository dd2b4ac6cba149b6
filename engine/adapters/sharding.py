"""Which rows and columns of each LoRA matrix a tensor-parallel rank holds.

A LoRA delta ``x @ A.T @ B.T`` follows its base projection's sharding (vLLM's rule):

- column-parallel projections (q/k/v, gate/up, …) keep all of ``A`` and the rows of ``B`` that
  give this rank's output rows — for a fused projection the rows of every part, in the order the
  layer lays them out (``[q | k | v]`` of this rank's heads, KV heads replicated when
  ``num_kv_heads < tp_size``);
- row-parallel projections (o_proj, down_proj, …) keep this rank's input columns of ``A`` and all
  of ``B``: each rank's delta is a partial sum, added to the partial output before the one
  all-reduce of the layer;
- replicated projections keep everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pageant.engine.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                          RowParallelLinear)


@dataclass(frozen=True)
class GroupShard:
    """One fused projection group's share on this rank.

    ``rows[i]``: the rows of slice ``i``'s full ``B`` this rank keeps (None: all); ``cols``: the
    columns of ``A`` it keeps (None: all)."""

    rows: tuple[torch.Tensor | None, ...]
    cols: torch.Tensor | None = None


def _span(start: int, size: int) -> torch.Tensor:
    return torch.arange(start, start + size)


def _qkv_rows(layer: QKVParallelLinear) -> list[torch.Tensor]:
    """Rows of q, k and v (each in its own full coordinates) this rank holds."""
    rank = layer.parallel.tp_rank
    kv_index = rank // layer.num_kv_head_replicas
    return [_span(rank * layer.q_size, layer.q_size), _span(kv_index * layer.kv_size, layer.kv_size),
            _span(kv_index * layer.kv_size, layer.kv_size)]


def _part_rows(layer: nn.Module) -> tuple[list[torch.Tensor], list[int]]:
    """Per output part of a column-parallel layer: the rows this rank holds and the part's full size."""
    rank, tp = layer.parallel.tp_rank, layer.parallel.tp_size
    if isinstance(layer, QKVParallelLinear):
        q_full, kv_full = layer.total_num_heads * layer.head_dim, layer.total_num_kv_heads * layer.head_dim
        return _qkv_rows(layer), [q_full, kv_full, kv_full]
    if isinstance(layer, MergedColumnParallelLinear):
        return [_span(rank * (n // tp), n // tp) for n in layer.output_sizes], list(layer.output_sizes)
    per = layer.output_size_per_partition
    return [_span(rank * per, per)], [layer.output_size]


def group_shard(layer: nn.Module, num_slices: int) -> GroupShard | None:
    """The share of a projection group of ``num_slices`` LoRA slices on ``layer`` (None: one rank)."""
    parallel = getattr(layer, "parallel", None)
    if parallel is None or parallel.tp_size == 1:
        return None
    if isinstance(layer, RowParallelLinear):
        n = layer.input_size_per_partition
        return GroupShard(rows=(None,) * num_slices, cols=_span(parallel.tp_rank * n, n))
    if not isinstance(layer, ColumnParallelLinear):
        return None  # replicated
    parts, sizes = _part_rows(layer)
    if num_slices == len(parts):  # one LoRA slice per part (Llama's q/k/v, gate/up)
        return GroupShard(rows=tuple(parts))
    if num_slices == 1:  # one LoRA slice over the fused output (GPT-NeoX's query_key_value, Phi-3's qkv_proj)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return GroupShard(rows=(torch.cat([r + o for r, o in zip(parts, offsets)]),))
    raise ValueError(f"cannot shard a LoRA group of {num_slices} slices over a layer of {len(parts)} parts")
