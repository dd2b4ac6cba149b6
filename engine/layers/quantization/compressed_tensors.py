"""compressed-tensors checkpoints (llm-compressor's output), weight-only, CPU dequant path.

Read from config.json's ``quantization_config`` (``quant_method: compressed-tensors``):
``config_groups`` (each: ``targets``, ``weights`` args, ``format``), ``ignore`` and ``format``.
Supported here:

- ``pack-quantized`` int4 / int8 weights (W4A16, W8A16), ``strategy`` channel or group,
  symmetric or asymmetric. Tensors per layer (compressed-tensors' ``PackedQuantizationCompressor``):
  ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]`` (element ``i`` of a row at bits
  ``i * bits`` of the row's little-endian bit stream, stored as ``q + 2**(bits-1)``),
  ``weight_scale`` ``[out, groups]`` (channel: ``[out, 1]``), ``weight_shape`` ``[out, in]`` and,
  asymmetric, ``weight_zero_point`` packed the same way along the *output* dim
  (``[ceil(out * bits / 32), groups]``). Dequantized: ``(q - zero) * scale`` per group.
- ``float-quantized`` / ``naive-quantized`` FP8 E4M3 weights (``weight`` float8_e4m3fn,
  ``weight_scale`` per tensor ``[1]`` or per channel ``[out, 1]``): ``weight * scale``.

In memory: ``weight_packed`` stays packed (int32), zero points are unpacked to int8
``[out, groups]`` (so merged q/k/v and gate/up shards concatenate by rows whatever their size),
FP8 weights stay float8 bytes and a per-tensor scale is stored per row (the shards of a merged
layer have different scales). ``apply`` dequantizes the layer's weight and runs ``F.linear``.
Activation quantization (W8A8, FP8 dynamic) is not supported: such a checkpoint is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.layers.quantization import QuantConfig

_PACK_FORMATS = ("pack-quantized",)
_FP8_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True)
class WeightArgs:
    """The ``weights`` entry of a config group (compressed-tensors' ``QuantizationArgs``)."""

    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # "channel" | "group" | "tensor"
    symmetric: bool
    group_size: int | None
    format: str

    @classmethod
    def from_config(cls, group_name: str, group: dict[str, Any], model_format: str | None) -> "WeightArgs":
        w = group.get("weights")
        where = f"compressed-tensors config group {group_name!r}"
        if not w:
            raise ValueError(f"{where} quantizes no weights; only weight quantization is supported")
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"{where} quantizes activations (W8A8 / dynamic FP8); only weight-only schemes "
                             "(W4A16, W8A16, FP8 weights) are supported")
        if w.get("dynamic"):
            raise ValueError(f"{where}: dynamic weight quantization is not supported")
        fmt = group.get("format") or model_format
        args = cls(num_bits=int(w.get("num_bits", 8)), type=str(w.get("type", "int")),
                   strategy=str(w.get("strategy", "tensor")), symmetric=bool(w.get("symmetric", True)),
                   group_size=w.get("group_size"), format=str(fmt))
        if args.type == "int":
            if args.format not in _PACK_FORMATS:
                raise ValueError(f"{where}: int weights in format {args.format!r} are not supported; "
                                 f"supported: {', '.join(_PACK_FORMATS)}")
            if args.num_bits not in (4, 8):
                raise ValueError(f"{where}: {args.num_bits}-bit int weights are not supported; supported: 4, 8")
            if args.strategy not in ("channel", "group"):
                raise ValueError(f"{where}: int weight strategy {args.strategy!r} is not supported; "
                                 "supported: channel, group")
            if args.strategy == "group" and not (isinstance(args.group_size, int) and args.group_size > 0):
                raise ValueError(f"{where}: group strategy needs a positive group_size, got {args.group_size!r}")
        elif args.type == "float":
            if args.num_bits != 8 or args.format not in _FP8_FORMATS:
                raise ValueError(f"{where}: float weights of {args.num_bits} bits in format {args.format!r} are not "
                                 f"supported; supported: 8-bit (FP8 E4M3) in {', '.join(_FP8_FORMATS)}")
            if args.strategy not in ("tensor", "channel"):
                raise ValueError(f"{where}: FP8 weight strategy {args.strategy!r} is not supported (block FP8 is "
                                 "not yet); supported: tensor, channel")
            if not args.symmetric:
                raise ValueError(f"{where}: asymmetric FP8 weights are not supported")
        else:
            raise ValueError(f"{where}: weight type {args.type!r} is not supported; supported: int, float")
        return args


def _matches(name: str, layer: nn.Module, target: str) -> bool:
    """compressed-tensors' matching: ``re:<regex>`` (``re.match`` on the module name), the exact
    module name, or a class name (our linear layers are ``Linear`` in the checkpoint's model)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], WeightArgs]], ignore: list[str]):
        self.groups, self.ignore = groups, ignore

    @classmethod
    def from_config(cls, qcfg: dict[str, Any]) -> "CompressedTensorsConfig":
        status = qcfg.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise ValueError(f"compressed-tensors checkpoint has quantization_status {status!r}; expected 'compressed'")
        if qcfg.get("kv_cache_scheme"):
            raise ValueError("compressed-tensors kv_cache_scheme (FP8 KV cache) is not supported yet")
        if qcfg.get("sparsity_config") or qcfg.get("transform_config"):
            raise ValueError("compressed-tensors sparsity / transform configs are not supported")
        groups_cfg = qcfg.get("config_groups") or {}
        if not groups_cfg:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        groups = [(list(g.get("targets") or []), WeightArgs.from_config(n, g, qcfg.get("format")))
                  for n, g in groups_cfg.items()]
        return cls(groups, list(qcfg.get("ignore") or []))

    def scheme_for(self, name: str, layer: nn.Module) -> WeightArgs | None:
        if any(_matches(name, layer, t) for t in self.ignore):
            return None
        for targets, args in self.groups:
            if any(_matches(name, layer, t) for t in targets):
                return args
        return None

    def get_quant_method(self, layer, prefix, checkpoint_names):
        schemes = {n: self.scheme_for(n, layer) for n in checkpoint_names}
        if len(set(schemes.values())) > 1:
            raise ValueError(f"the checkpoint quantizes the parts of {prefix} ({', '.join(checkpoint_names)}) "
                             f"differently ({schemes}); they are one merged layer here")
        args = next(iter(schemes.values()))
        if args is None:
            return None
        if args.type == "int":
            if args.strategy == "group" and layer.input_size_per_partition % args.group_size:
                raise ValueError(f"{prefix}: {layer.input_size_per_partition} input features are not a multiple of "
                                 f"group_size {args.group_size}")
            return CompressedTensorsWNA16Method(args)
        return CompressedTensorsW8A16Fp8Method(args)


def shard_rows(layer: nn.Module, shard_id) -> int:
    """Output rows of checkpoint part ``shard_id`` of ``layer`` (None: the whole layer)."""
    if shard_id is None:
        return layer.output_size_per_partition
    if hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear
        heads = layer.total_num_heads if shard_id == "q" else layer.total_num_kv_heads
        return heads * layer.head_dim
    return layer.output_sizes[shard_id]


def _param_name(layer: nn.Module, param: torch.Tensor) -> str:
    for name, p in layer.named_parameters(recurse=False):
        if p is param:
            return name
    for name, b in layer.named_buffers(recurse=False):
        if b is param:
            return name
    raise ValueError("parameter does not belong to the layer")


def unpack_int32(packed: torch.Tensor, num_bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' ``unpack_from_int32`` along the last dim for 4 and 8 bits:
    ``[..., words]`` int32 -> ``[..., count]`` int8 in ``[-2**(bits-1), 2**(bits-1))``."""
    b = packed.contiguous().view(torch.uint8)  # little-endian bytes: element i at bit i * bits
    if num_bits == 4:
        b = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    if b.shape[-1] < count:
        raise ValueError(f"packed tensor holds {b.shape[-1]} values per row, expected {count}")
    return (b[..., :count].to(torch.int16) - (1 << (num_bits - 1))).to(torch.int8)


class CompressedTensorsWNA16Method:
    """Weight-only int4 / int8 (``pack-quantized``): packed int32 weights, per-channel or per-group
    scales, optional int8 zero points; dequantized per call on the CPU (no fused kernel yet)."""

    def __init__(self, args: WeightArgs):
        self.args = args

    def groups(self, input_size: int) -> int:
        return 1 if self.args.strategy == "channel" else input_size // self.args.group_size

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        bits = self.args.num_bits
        words = -(-input_size * bits // 32)
        groups = self.groups(input_size)
        layer.register_parameter("weight_packed", nn.Parameter(
            torch.empty(output_size, words, dtype=torch.int32), requires_grad=False))
        layer.register_parameter("weight_scale", nn.Parameter(
            torch.empty(output_size, groups, dtype=dtype), requires_grad=False))
        layer.register_parameter("weight_shape", nn.Parameter(
            torch.empty(2, dtype=torch.int64), requires_grad=False))
        if not self.args.symmetric:
            layer.register_parameter("weight_zero_point", nn.Parameter(
                torch.empty(output_size, groups, dtype=torch.int8), requires_grad=False))

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = _param_name(layer, param)
        bits, cols = self.args.num_bits, layer.input_size_per_partition
        rows = shard_rows(layer, shard_id)
        groups = self.groups(cols)
        if name == "weight_shape":
            if tuple(int(v) for v in loaded.reshape(-1)) != (rows, cols):
                raise ValueError(f"weight_shape {loaded.tolist()} disagrees with the model's ({rows}, {cols})")
            param.data.copy_(torch.tensor([layer.output_size_per_partition, cols]))
            return
        if name == "weight_packed":
            words = -(-cols * bits // 32)
            if loaded.dtype != torch.int32 or tuple(loaded.shape) != (rows, words):
                raise ValueError(f"packed weight is {loaded.dtype} {tuple(loaded.shape)}, expected int32 {(rows, words)} "
                                 f"({rows} x {cols} {bits}-bit values, {32 // bits} per int32)")
        elif name == "weight_scale":
            if tuple(loaded.shape) != (rows, groups):
                raise ValueError(f"scale has shape {tuple(loaded.shape)}, expected {(rows, groups)} "
                                 f"({self.args.strategy} strategy"
                                 f"{', group_size ' + str(self.args.group_size) if self.args.strategy == 'group' else ''})")
        elif name == "weight_zero_point" and loaded.dtype == torch.int32:  # packed along the output rows
            words = -(-rows * bits // 32)
            if tuple(loaded.shape) != (words, groups):
                raise ValueError(f"packed zero point has shape {tuple(loaded.shape)}, expected {(words, groups)}")
            loaded = unpack_int32(loaded.t(), bits, rows).t()
        dense(param, loaded, shard_id)

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The layer's ``[out, in]`` weight in ``dtype``: ``(q - zero) * scale`` per group."""
        out, cols = layer.weight_packed.shape[0], layer.input_size_per_partition
        scale = layer.weight_scale
        q = unpack_int32(layer.weight_packed, self.args.num_bits, cols).to(scale.dtype)
        q = q.view(out, scale.shape[1], -1)  # [out, groups, group size]
        zero = getattr(layer, "weight_zero_point", None)
        if zero is not None:
            q = q - zero.to(scale.dtype).unsqueeze(-1)
        return (q * scale.unsqueeze(-1)).view(out, cols).to(dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantize(layer, x.dtype), bias)


class CompressedTensorsW8A16Fp8Method:
    """FP8 E4M3 weights (stored as float8 bytes) with one scale per output row; weight-only
    (dequantized per call: ``weight * scale``)."""

    def __init__(self, args: WeightArgs | None = None):
        self.args = args

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        layer.register_parameter("weight", nn.Parameter(
            torch.empty(output_size, input_size, dtype=torch.float8_e4m3fn), requires_grad=False))
        layer.register_parameter("weight_scale", nn.Parameter(
            torch.empty(output_size, 1, dtype=dtype), requires_grad=False))

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = _param_name(layer, param)
        rows, cols = shard_rows(layer, shard_id), layer.input_size_per_partition
        if name == "weight":
            if loaded.dtype != torch.float8_e4m3fn or tuple(loaded.shape) != (rows, cols):
                raise ValueError(f"FP8 weight is {loaded.dtype} {tuple(loaded.shape)}, expected float8_e4m3fn "
                                 f"{(rows, cols)}")
        elif name == "weight_scale":
            if loaded.numel() == 1:  # per tensor: one scale per row of this shard
                loaded = loaded.reshape(1, 1).expand(rows, 1)
            elif tuple(loaded.shape) != (rows, 1):
                raise ValueError(f"FP8 scale has shape {tuple(loaded.shape)}, expected [1] or {(rows, 1)}")
        dense(param, loaded, shard_id)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale = layer.weight_scale
        weight = (layer.weight.to(scale.dtype) * scale).to(x.dtype)
        return F.linear(x, weight, bias)
