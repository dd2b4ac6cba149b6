"""compressed-tensors ``int-quantized`` weights (W8A8 int8; W4A8 / W4AFP8 store their 4-bit values
one per byte in the same format), CPU dequant path.

Tensors per layer: ``weight`` int8 ``[out, in]`` (symmetric), ``weight_scale`` per channel
``[out, 1]``, per tensor ``[1]`` (stored per row here) or per group ``[out, in / group_size]``.
Dequantized: ``weight * scale``. The scheme's ``input_activations`` are fake-quantized before the
matmul (``activations.py``), as Hugging Face's compressed-tensors integration does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from pageant.engine.layers.quantization import activations as act
from pageant.engine.layers.quantization.activations import InputArgs
from pageant.engine.layers.quantization.sharding import checkpoint_rows, param_name, place

if TYPE_CHECKING:
    from pageant.engine.layers.quantization.compressed_tensors import WeightArgs


class CompressedTensorsW8A8Int8Method:
    """``int-quantized`` weights (W8A8, and W4A8 / W4AFP8 whose 4-bit values are stored one per
    byte): ``weight`` int8 ``[out, in]``, symmetric, a scale per channel ``[out, 1]``, per tensor
    ``[1]`` or per group ``[out, in / group_size]``; dequantized per call, the scheme's input
    activations fake-quantized first."""

    def __init__(self, args: "WeightArgs", input_args: InputArgs | None = None):
        self.args, self.input_args = args, input_args

    def groups(self, input_size: int) -> int:
        return input_size // self.args.group_size if self.args.strategy == "group" else 1

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        layer.register_parameter("weight", nn.Parameter(
            torch.empty(output_size, input_size, dtype=torch.int8), requires_grad=False))
        layer.register_parameter("weight_scale", nn.Parameter(
            torch.empty(output_size, self.groups(input_size), dtype=dtype), requires_grad=False))
        act.create_input_params(layer, self.input_args, output_size, dtype)

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = param_name(layer, param)
        if act.load_input_or_weight(layer, name, param, loaded, shard_id, dense, torch.int8, "int8"):
            return
        rows, cols = checkpoint_rows(layer, shard_id), layer.input_size
        per_group = name == "weight_scale" and self.args.strategy == "group"
        if name == "weight_scale":
            want = (rows, self.groups(cols))
            if loaded.numel() == 1 and self.args.strategy == "tensor":  # one scale per row of this part
                loaded = loaded.reshape(1, 1).expand(rows, 1)
            elif tuple(loaded.shape) != want:
                raise ValueError(f"int8 scale has shape {tuple(loaded.shape)}, expected {want} "
                                 f"({self.args.strategy} strategy)")
        place(layer, param, loaded, shard_id, dense, input_dim=1 if per_group else None)

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The layer's ``[out, in]`` weight in ``dtype``: ``weight * scale`` per row or group."""
        scale = layer.weight_scale  # [out, groups]
        out, cols = layer.weight.shape
        q = layer.weight.to(scale.dtype).view(out, scale.shape[1], -1)  # [out, groups, group size]
        return (q * scale.unsqueeze(-1)).view(out, cols).to(dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return act.linear(layer, self.input_args, x, self.dequantize(layer, x.dtype), bias)
