"""compressed-tensors checkpoints (llm-compressor's output), CPU dequant path.

Read from config.json's ``quantization_config`` (``quant_method: compressed-tensors``):
``config_groups`` (each: ``targets``, ``weights`` and ``input_activations`` args, ``format``),
``ignore`` and ``format``. Supported here:

- ``pack-quantized`` int4 / int8 weights (W4A16, W8A16), ``strategy`` channel or group,
  symmetric or asymmetric. Tensors per layer (compressed-tensors' ``PackedQuantizationCompressor``):
  ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]`` (element ``i`` of a row at bits
  ``i * bits`` of the row's little-endian bit stream, stored as ``q + 2**(bits-1)``),
  ``weight_scale`` ``[out, groups]`` (channel: ``[out, 1]``), ``weight_shape`` ``[out, in]`` and,
  asymmetric, ``weight_zero_point`` packed the same way along the *output* dim
  (``[ceil(out * bits / 32), groups]``). Dequantized: ``(q - zero) * scale`` per group.
- ``int-quantized`` weights (W8A8; W4A8 / W4AFP8 keep 4-bit values one per byte): ``weight`` int8
  ``[out, in]``, symmetric, ``weight_scale`` per channel, tensor or group; see ``int_quantized.py``.
- ``float-quantized`` / ``naive-quantized`` FP8 E4M3 weights (``weight`` float8_e4m3fn,
  ``weight_scale`` per tensor ``[1]``, per channel ``[out, 1]`` or, ``strategy: block``, per
  ``block_structure`` block ``[ceil(out / bn), ceil(in / bk)]``; see ``fp8_block.py``).
- ``input_activations`` (W8A8 int8, FP8 dynamic, FP8 block's per-group activations, static
  ``input_scale``): fake-quantized before the matmul exactly as Hugging Face's compressed-tensors
  integration does; see ``activations.py``. Output activations and KV-cache schemes are refused.

In memory: ``weight_packed`` stays packed (int32), zero points are unpacked to int8
``[out, groups]`` (so merged q/k/v and gate/up shards concatenate by rows whatever their size),
FP8 / int8 weights stay 1-byte and a per-tensor scale is stored per row (the shards of a merged
layer have different scales). ``apply`` dequantizes the layer's weight and runs ``F.linear``.
Tensor parallelism: see ``sharding.py`` (packed words, groups and blocks split whole).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from pageant.engine.layers.quantization import QuantConfig
from pageant.engine.layers.quantization import activations as act
from pageant.engine.layers.quantization.activations import InputArgs
from pageant.engine.layers.quantization.fp8_block import BlockFp8Method, check_blocks
from pageant.engine.layers.quantization.int_quantized import CompressedTensorsW8A8Int8Method
from pageant.engine.layers.quantization.sharding import check_input_split, checkpoint_rows, param_name, place

_PACK_FORMATS = ("pack-quantized",)
_INT8_FORMATS = ("int-quantized",)
_FP8_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True)
class WeightArgs:
    """The ``weights`` entry of a config group (compressed-tensors' ``QuantizationArgs``)."""

    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # "channel" | "group" | "tensor" | "block"
    symmetric: bool
    group_size: int | None
    format: str
    block_structure: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, group_name: str, group: dict[str, Any], model_format: str | None) -> "WeightArgs":
        w = group.get("weights")
        where = f"compressed-tensors config group {group_name!r}"
        if not w:
            raise ValueError(f"{where} quantizes no weights; supported: weight quantization (W4A16, W8A16, W8A8, "
                             "FP8), optionally with input activations")
        if group.get("output_activations"):
            raise ValueError(f"{where} quantizes output activations, which is not supported; supported: weights "
                             "and input_activations")
        if w.get("dynamic"):
            raise ValueError(f"{where}: dynamic weight quantization is not supported")
        fmt = group.get("format") or model_format
        block = w.get("block_structure")
        if block is not None and not (isinstance(block, (list, tuple)) and all(isinstance(v, int) for v in block)):
            raise ValueError(f"{where}: block_structure must be a list of two integers, got {block!r}")
        args = cls(num_bits=int(w.get("num_bits", 8)), type=str(w.get("type", "int")),
                   strategy=str(w.get("strategy", "tensor")), symmetric=bool(w.get("symmetric", True)),
                   group_size=w.get("group_size"), format=str(fmt),
                   block_structure=None if block is None else tuple(int(b) for b in block))
        if args.type == "int" and args.format in _INT8_FORMATS:
            if args.num_bits not in (4, 8) or args.strategy not in ("channel", "tensor", "group") or not args.symmetric:
                raise ValueError(f"{where}: {'' if args.symmetric else 'asymmetric '}{args.num_bits}-bit int weights "
                                 f"with strategy {args.strategy!r} in format {args.format!r} are not supported; "
                                 "supported: symmetric 4- or 8-bit, strategy channel, tensor or group")
            if args.strategy == "group" and not (isinstance(args.group_size, int) and args.group_size > 0):
                raise ValueError(f"{where}: group strategy needs a positive group_size, got {args.group_size!r}")
        elif args.type == "int":
            if args.format not in _PACK_FORMATS:
                raise ValueError(f"{where}: int weights in format {args.format!r} are not supported; "
                                 f"supported: {', '.join(_PACK_FORMATS + _INT8_FORMATS)}")
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
            if args.strategy not in ("tensor", "channel", "block"):
                raise ValueError(f"{where}: FP8 weight strategy {args.strategy!r} is not supported; "
                                 "supported: tensor, channel, block")
            if args.strategy == "block" and (block is None or len(block) != 2 or min(block) <= 0):
                raise ValueError(f"{where}: block strategy needs a block_structure of two positive sizes, got {block!r}")
            if not args.symmetric:
                raise ValueError(f"{where}: asymmetric FP8 weights are not supported")
        else:
            raise ValueError(f"{where}: weight type {args.type!r} is not supported; supported: int, float")
        return args


@dataclass(frozen=True)
class Scheme:
    """A config group's weight args and (optional) input-activation args."""

    weights: WeightArgs
    input: InputArgs | None = None

    @classmethod
    def from_config(cls, group_name: str, group: dict[str, Any], model_format: str | None) -> "Scheme":
        a = group.get("input_activations")
        where = f"compressed-tensors config group {group_name!r}"
        return cls(WeightArgs.from_config(group_name, group, model_format),
                   InputArgs.from_config(where, a) if a else None)


def _matches(name: str, layer: nn.Module, target: str) -> bool:
    """compressed-tensors' matching: ``re:<regex>`` (``re.match`` on the module name), the exact
    module name, or a class name (our linear layers are ``Linear`` in the checkpoint's model)."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


class CompressedTensorsConfig(QuantConfig):
    """A compressed-tensors ``quantization_config``: which scheme covers which linear layer."""

    name = "compressed-tensors"

    def __init__(self, groups: list[tuple[list[str], Scheme]], ignore: list[str]):
        self.groups, self.ignore = groups, ignore

    @classmethod
    def from_config(cls, qcfg: dict[str, Any]) -> "CompressedTensorsConfig":
        status = qcfg.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise ValueError(f"compressed-tensors checkpoint has quantization_status {status!r}; expected 'compressed'")
        kv = qcfg.get("kv_cache_scheme")
        if kv:  # the k/v scales load into the attention layers; kv_cache_dtype="fp8" uses them
            if (kv.get("type"), kv.get("num_bits"), kv.get("strategy", "tensor"), kv.get("dynamic", False)) != \
                    ("float", 8, "tensor", False):
                raise ValueError(f"compressed-tensors kv_cache_scheme {kv} is not supported; supported: FP8 "
                                 "(type float, num_bits 8) with static per-tensor scales")
        if qcfg.get("sparsity_config") or qcfg.get("transform_config"):
            raise ValueError("compressed-tensors sparsity / transform configs are not supported")
        groups_cfg = qcfg.get("config_groups") or {}
        if not groups_cfg and not kv:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        groups = [(list(g.get("targets") or []), Scheme.from_config(n, g, qcfg.get("format")))
                  for n, g in groups_cfg.items()]
        return cls(groups, list(qcfg.get("ignore") or []))

    def scheme_for(self, name: str, layer: nn.Module) -> Scheme | None:
        if any(_matches(name, layer, t) for t in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(name, layer, t) for t in targets):
                return scheme
        return None

    def get_quant_method(self, layer, prefix, checkpoint_names):
        schemes = {n: self.scheme_for(n, layer) for n in checkpoint_names}
        if len(set(schemes.values())) > 1:
            raise ValueError(f"the checkpoint quantizes the parts of {prefix} ({', '.join(checkpoint_names)}) "
                             f"differently ({schemes}); they are one merged layer here")
        scheme = next(iter(schemes.values()))
        if scheme is None:
            return None
        args = scheme.weights
        if scheme.input is not None and scheme.input.strategy == "group":
            check_input_split(layer, prefix, scheme.input.group_size, f"input group_size {scheme.input.group_size}")
            if layer.input_size_per_partition % scheme.input.group_size:
                raise ValueError(f"{prefix}: {layer.input_size_per_partition} input features are not a multiple of "
                                 f"the input activations' group_size {scheme.input.group_size}")
        if args.type == "int":
            if args.format in _PACK_FORMATS:
                check_input_split(layer, prefix, 32 // args.num_bits,
                                  f"{32 // args.num_bits} ({args.num_bits}-bit values packed per int32)")
            if args.strategy == "group":
                check_input_split(layer, prefix, args.group_size, f"group_size {args.group_size}")
                if layer.input_size_per_partition % args.group_size:
                    raise ValueError(f"{prefix}: {layer.input_size_per_partition} input features are not a multiple "
                                     f"of group_size {args.group_size}")
            if args.format in _INT8_FORMATS:
                return CompressedTensorsW8A8Int8Method(args, scheme.input)
            return CompressedTensorsWNA16Method(args, scheme.input)
        if args.strategy == "block":
            check_blocks(layer, prefix, args.block_structure)
            return BlockFp8Method(args.block_structure, "weight_scale", scheme.input)
        return CompressedTensorsW8A16Fp8Method(args, scheme.input)


shard_rows = checkpoint_rows  # older names: rows of a checkpoint part (all ranks'), a parameter's name
_param_name = param_name


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
    """int4 / int8 ``pack-quantized`` weights: packed int32 weights, per-channel or per-group
    scales, optional int8 zero points; dequantized per call on the CPU (input activations
    fake-quantized first when the scheme has them, e.g. W4AFP8)."""

    def __init__(self, args: WeightArgs, input_args: InputArgs | None = None):
        self.args, self.input_args = args, input_args

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
        act.create_input_params(layer, self.input_args, output_size, dtype)

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = _param_name(layer, param)
        bits, cols = self.args.num_bits, layer.input_size  # the checkpoint's tensors span every rank
        rows = checkpoint_rows(layer, shard_id)
        groups = self.groups(cols)
        per_group = self.args.strategy == "group"  # scales / zero points split along the input with it
        if act.load_input_param(layer, name, param, loaded, shard_id, dense):
            return
        if name == "weight_shape":
            if tuple(int(v) for v in loaded.reshape(-1)) != (rows, cols):
                raise ValueError(f"weight_shape {loaded.tolist()} disagrees with the model's ({rows}, {cols})")
            param.data.copy_(torch.tensor([layer.output_size_per_partition, layer.input_size_per_partition]))
            return
        if name == "weight_packed":
            words = -(-cols * bits // 32)
            if loaded.dtype != torch.int32 or tuple(loaded.shape) != (rows, words):
                raise ValueError(f"packed weight is {loaded.dtype} {tuple(loaded.shape)}, expected int32 {(rows, words)} "
                                 f"({rows} x {cols} {bits}-bit values, {32 // bits} per int32)")
            return place(layer, param, loaded, shard_id, dense, input_dim=1)
        if name == "weight_scale":
            if tuple(loaded.shape) != (rows, groups):
                raise ValueError(f"scale has shape {tuple(loaded.shape)}, expected {(rows, groups)} "
                                 f"({self.args.strategy} strategy"
                                 f"{', group_size ' + str(self.args.group_size) if per_group else ''})")
        elif name == "weight_zero_point":
            if loaded.dtype == torch.int32:  # packed along the output rows
                words = -(-rows * bits // 32)
                if tuple(loaded.shape) != (words, groups):
                    raise ValueError(f"packed zero point has shape {tuple(loaded.shape)}, expected {(words, groups)}")
                loaded = unpack_int32(loaded.t(), bits, rows).t()
            elif tuple(loaded.shape) != (rows, groups):
                raise ValueError(f"zero point has shape {tuple(loaded.shape)}, expected {(rows, groups)}")
        elif name != "bias":
            raise ValueError(f"unexpected compressed-tensors tensor {name!r}")
        place(layer, param, loaded, shard_id, dense, input_dim=1 if per_group and name != "bias" else None)

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
        if self.input_args is None:  # weight-only: Triton dequant GEMM on CUDA, the same dequant on the CPU
            from pageant.engine.layers.quantization import gemm

            bits = self.args.num_bits
            return gemm.int_weight_gemm(x, layer.weight_packed, layer.weight_scale, bits=bits,
                                        group_size=self.args.group_size if self.args.strategy == "group" else -1,
                                        zeros=getattr(layer, "weight_zero_point", None), zero_offset=1 << (bits - 1),
                                        bias=bias)
        return act.linear(layer, self.input_args, x, self.dequantize(layer, x.dtype), bias)


class CompressedTensorsW8A16Fp8Method:
    """FP8 E4M3 weights (stored as float8 bytes) with one scale per output row, dequantized per
    call (``weight * scale``); input activations fake-quantized first when the scheme has them
    (FP8 dynamic / static: W8A8-FP8)."""

    storage = torch.float8_e4m3fn

    def __init__(self, args: WeightArgs | None = None, input_args: InputArgs | None = None):
        self.args, self.input_args = args, input_args

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        layer.register_parameter("weight", nn.Parameter(
            torch.empty(output_size, input_size, dtype=self.storage), requires_grad=False))
        layer.register_parameter("weight_scale", nn.Parameter(
            torch.empty(output_size, 1, dtype=dtype), requires_grad=False))
        act.create_input_params(layer, self.input_args, output_size, dtype)

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = _param_name(layer, param)
        what = "FP8" if self.storage == torch.float8_e4m3fn else "int8"
        if act.load_input_or_weight(layer, name, param, loaded, shard_id, dense, self.storage, what):
            return
        rows = checkpoint_rows(layer, shard_id)
        if name == "weight_scale":
            if loaded.numel() == 1:  # per tensor: one scale per row of this shard
                loaded = loaded.reshape(1, 1).expand(rows, 1)
            elif tuple(loaded.shape) != (rows, 1):
                raise ValueError(f"{what} scale has shape {tuple(loaded.shape)}, expected [1] or {(rows, 1)}")
        place(layer, param, loaded, shard_id, dense, input_dim=None)  # scales (and a bias): whole on every rank

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The layer's ``[out, in]`` weight in ``dtype``: ``weight * scale`` per row."""
        scale = layer.weight_scale
        return (layer.weight.to(scale.dtype) * scale).to(dtype)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from pageant.engine.layers.quantization import gemm

        if self.storage == torch.float8_e4m3fn and gemm.handles_fp8_input(self.input_args, x):
            return gemm.fp8_gemm(x, layer.weight, layer.weight_scale, bias, dynamic_per_token=self.input_args is not None)
        return act.linear(layer, self.input_args, x, self.dequantize(layer, x.dtype), bias)
