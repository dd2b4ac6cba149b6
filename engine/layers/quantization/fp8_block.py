"""Block-wise FP8 weights (DeepSeek-V3 / Qwen3-FP8 style, and compressed-tensors' ``strategy:
block``): one scale per ``block_n x block_k`` block of the weight, CPU dequant path.

Checkpoint tensors per linear layer: ``weight`` float8_e4m3fn ``[N, K]`` and the scale grid
``[ceil(N / block_n), ceil(K / block_k)]`` (``quant_method: fp8`` names it ``weight_scale_inv``,
compressed-tensors ``weight_scale``; both are multiplied in). Dequantized:
``W[n, k] = weight[n, k] * scale[n // block_n, k // block_k]`` — what transformers'
``Fp8Dequantize`` and compressed-tensors' block decompression compute.

In memory the same layout (FP8 bytes and the small grid, in the model dtype): each part of a merged
layer (q/k/v, gate/up) adds its own block rows, so every part must hold whole blocks of rows on
each rank, and a row-parallel split must keep whole blocks of input features (``check_blocks``
refuses anything else at startup). A single layer at ``tp_size`` 1 may end in a partial block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pageant.engine.layers.quantization import activations as act
from pageant.engine.layers.quantization.activations import InputArgs
from pageant.engine.layers.quantization.sharding import (check_input_split, checkpoint_rows, copy_checked,
                                                         is_row_split, param_name, parts, place, row_slices)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_blocks(layer: nn.Module, prefix: str, block: tuple[int, int]) -> None:
    """Refuse a layer whose rank's rows of some part do not start and end on a block boundary (the
    last part may end in a partial block where the checkpoint part does), or whose row-parallel
    split cuts an input block."""
    bn, bk = block
    layer_parts = parts(layer)
    for part in layer_parts:
        dst, src, size = row_slices(layer, part)
        full = checkpoint_rows(layer, part)
        ends_partial = dst + size == layer.output_size_per_partition and src + size == full
        if dst % bn or src % bn or (size % bn and not ends_partial):
            what = f"part {part!r} of " if part is not None else ""
            split = f" split over {layer.parallel.tp_size} ranks" if layer.parallel.tp_size > 1 else ""
            raise ValueError(f"{prefix}: {what}{full} output rows{split} ({size} on this rank) do not keep whole "
                             f"weight blocks of {bn} rows; block-wise FP8 needs every merged part (q/k/v, "
                             f"gate/up) and every rank's share to be a multiple of {bn} rows")
    check_input_split(layer, prefix, bk, f"the weight block width {bk}")


class BlockFp8Method:
    """FP8 E4M3 weights with one scale per ``block`` (``(block_n, block_k)``) block, dequantized
    per call; ``scale_name`` is the checkpoint's name for the grid; input activations
    fake-quantized first when a compressed-tensors scheme has them (per token group)."""

    def __init__(self, block: tuple[int, int], scale_name: str = "weight_scale_inv",
                 input_args: InputArgs | None = None):
        self.block, self.scale_name, self.input_args = tuple(block), scale_name, input_args

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        bn, bk = self.block
        layer.register_parameter("weight", nn.Parameter(
            torch.empty(output_size, input_size, dtype=torch.float8_e4m3fn), requires_grad=False))
        layer.register_parameter(self.scale_name, nn.Parameter(  # [ceil(out / bn), ceil(in / bk)]
            torch.empty(_cdiv(output_size, bn), _cdiv(input_size, bk), dtype=dtype), requires_grad=False))
        act.create_input_params(layer, self.input_args, output_size, dtype)

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = param_name(layer, param)
        if act.load_input_or_weight(layer, name, param, loaded, shard_id, dense, torch.float8_e4m3fn, "FP8"):
            return
        rows, cols = checkpoint_rows(layer, shard_id), layer.input_size
        if name != self.scale_name:  # a bias
            return place(layer, param, loaded, shard_id, dense, input_dim=None)
        bn, bk = self.block
        grid = (_cdiv(rows, bn), _cdiv(cols, bk))
        if tuple(loaded.shape) != grid or not loaded.is_floating_point():
            raise ValueError(f"block scale is {str(loaded.dtype).replace('torch.', '')} {tuple(loaded.shape)}, "
                             f"expected a float {grid} ({rows} x {cols} weight in {bn} x {bk} blocks)")
        if shard_id is None and layer.shard_ids:  # a fused checkpoint tensor: its parts one by one
            sizes = [_cdiv(checkpoint_rows(layer, p), bn) for p in layer.shard_ids]
            for part, chunk in zip(layer.shard_ids, loaded.split(sizes, dim=0)):
                self.weight_loader(layer, param, chunk, part, dense)
            return
        dst, src, size = row_slices(layer, shard_id)  # rows; whole blocks (check_blocks)
        chunk = loaded.narrow(0, src // bn, _cdiv(size, bn))
        if is_row_split(layer):
            n = param.shape[1]
            chunk = chunk.narrow(1, layer.parallel.tp_rank * n, n)
        copy_checked(param.data.narrow(0, dst // bn, chunk.shape[0]), chunk)

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The layer's ``[out, in]`` weight in ``dtype``: each block times its scale."""
        bn, bk = self.block
        out, cols = layer.weight.shape
        scale = getattr(layer, self.scale_name)  # [ceil(out / bn), ceil(in / bk)]
        per_weight = scale.repeat_interleave(bn, 0)[:out].repeat_interleave(bk, 1)[:, :cols]  # [out, in]
        return (layer.weight.to(scale.dtype) * per_weight).to(dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.is_cuda and (self.input_args is None or self.input_args.dynamic):  # the Triton block-FP8 GEMMs
            from pageant.engine.layers.quantization import gemm

            return gemm.block_fp8_gemm(x, layer.weight, getattr(layer, self.scale_name), self.block, bias,
                                       dynamic_per_group=self.input_args is not None)
        return act.linear(layer, self.input_args, x, self.dequantize(layer, x.dtype), bias)
