"""Tensor-parallel placement of quantized checkpoint tensors (shared by every quant method).

A quant method's ``weight_loader`` first turns a checkpoint tensor into its in-memory layout over
the *whole* checkpoint part (all output rows of the part, all input features), then ``place``s it:

- column-parallel layers (and merged q/k/v, gate/up): the layer's own dense loader narrows the
  output rows to this rank's and puts each part at its offset (``linear.py``'s rules);
- row-parallel layers with ``tp_size > 1``: the input features are split, so each tensor is
  narrowed along its input dimension here: ``input_dim`` 1 for packed weights (int32 words along
  K), group scales and zero points, block scales; ``None`` for what every rank holds whole
  (per-channel and per-tensor scales, biases, act-order group tables).

``check_input_split`` refuses, at startup, a tensor-parallel size that cuts through a packed int32
word, a quantization group or a weight block; ``row_slices`` says where a part's rows land (block
scales hold one row per ``block_n`` output rows, so they are placed here, not by the dense loader).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def is_row_split(layer: nn.Module) -> bool:
    """Whether ``layer`` holds only part of its input features (row-parallel, ``tp_size > 1``)."""
    from pageant.engine.layers.linear import RowParallelLinear

    return isinstance(layer, RowParallelLinear) and layer.parallel.tp_size > 1


def checkpoint_rows(layer: nn.Module, shard_id) -> int:
    """Output rows of checkpoint part ``shard_id`` of ``layer`` in the checkpoint (all ranks');
    None: the whole (possibly fused) checkpoint tensor."""
    if hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear
        if shard_id is None:
            return (layer.total_num_heads + 2 * layer.total_num_kv_heads) * layer.head_dim
        heads = layer.total_num_heads if shard_id == "q" else layer.total_num_kv_heads
        return heads * layer.head_dim
    if hasattr(layer, "output_sizes"):  # MergedColumnParallelLinear
        return sum(layer.output_sizes) if shard_id is None else layer.output_sizes[shard_id]
    return layer.output_size


def parts(layer: nn.Module) -> list:
    """The checkpoint parts of ``layer``: its ``shard_ids``, or ``[None]`` (loaded in one piece)."""
    return list(layer.shard_ids) if layer.shard_ids else [None]


def row_slices(layer: nn.Module, shard_id) -> tuple[int, int, int]:
    """``(first row in this rank's parameter, first row in the checkpoint part, rows)``: where the
    layer's dense loader puts this rank's rows of checkpoint part ``shard_id`` (mirrors
    ``linear.py``; a test checks the two agree)."""
    from pageant.engine.layers.linear import ColumnParallelLinear

    tp, rank = layer.parallel.tp_size, layer.parallel.tp_rank
    if hasattr(layer, "total_num_kv_heads"):
        if shard_id == "q":
            return 0, rank * layer.q_size, layer.q_size
        offset = layer.q_size + (layer.kv_size if shard_id == "v" else 0)
        return offset, (rank // layer.num_kv_head_replicas) * layer.kv_size, layer.kv_size
    if hasattr(layer, "output_sizes"):
        offset, size = layer.shard_range(shard_id)
        return offset, rank * size, size
    rows = layer.output_size_per_partition
    return 0, (rank * rows if isinstance(layer, ColumnParallelLinear) and tp > 1 else 0), rows


def param_name(layer: nn.Module, param: torch.Tensor) -> str:
    """The name under which ``layer`` holds ``param`` (a parameter or a buffer)."""
    for name, p in layer.named_parameters(recurse=False):
        if p is param:
            return name
    for name, b in layer.named_buffers(recurse=False):
        if b is param:
            return name
    raise ValueError("parameter does not belong to the layer")


def copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit the parameter's {tuple(param.shape)}")
    param.data.copy_(loaded.to(param.dtype))


def place(layer: nn.Module, param: torch.Tensor, loaded: torch.Tensor, shard_id, dense: Callable,
          input_dim: int | None = 1) -> None:
    """Put ``loaded`` (the in-memory layout of a whole checkpoint part) into ``param``: this rank's
    input slice along ``input_dim`` on a split row-parallel layer (None: the whole tensor on every
    rank), the layer's ``dense`` loader (rows by part and rank) otherwise."""
    if not is_row_split(layer):
        dense(param, loaded, shard_id)
        return
    if input_dim is not None:
        tp, rank, n = layer.parallel.tp_size, layer.parallel.tp_rank, param.shape[input_dim]
        if loaded.shape[input_dim] != n * tp:
            raise ValueError(f"shape {tuple(loaded.shape)} has {loaded.shape[input_dim]} entries along dim "
                             f"{input_dim}, expected {n * tp} ({n} on each of {tp} ranks)")
        loaded = loaded.narrow(input_dim, rank * n, n)
    copy_checked(param, loaded)


def check_input_split(layer: nn.Module, prefix: str, multiple: int, what: str) -> None:
    """Refuse a row-parallel split whose per-rank input features are not a multiple of
    ``multiple`` (``what`` names it: "group_size 128", "weight block 128", "8 4-bit values per
    int32"); at ``tp_size`` 1 nothing is split."""
    if not is_row_split(layer) or layer.input_size_per_partition % multiple == 0:
        return
    tp = layer.parallel.tp_size
    raise ValueError(f"{prefix}: tensor parallel size {tp} splits its {layer.input_size} input features into "
                     f"{layer.input_size_per_partition} per rank, which is not a multiple of {what}; "
                     "use a tensor parallel size that keeps whole quantization groups on each rank")
