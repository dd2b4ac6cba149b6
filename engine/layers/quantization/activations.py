"""Input-activation quantization of compressed-tensors schemes (W8A8 int8, FP8 dynamic, FP8 block).

What Hugging Face computes, and so what this CPU path computes: transformers' compressed-tensors
integration, by default (``CompressedTensorsConfig()``, not ``dequantize=True``), keeps each
quantized ``nn.Linear`` wrapped by compressed-tensors' ``set_forward_quantized``: the weights are
decompressed once (dequantized to the model dtype), and every forward *fake-quantizes the input*
(quantize, round, dequantize, in the model dtype) with the scheme's ``input_activations`` args
before the float matmul. (``dequantize=True`` drops the schemes and so the activation
quantization: the logits differ.) Reproduced here operation for operation
(``compute_dynamic_scales_and_zp``, ``calculate_qparams``, ``_quantize_dequantize``):

- ``dynamic: true``, ``strategy: token``: per token ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)``;
  symmetric ``scale = max(|lo|, |hi|) / ((q_max - q_min) / 2)`` (int8: / 127.5, FP8 E4M3: / 448),
  zero point 0; asymmetric ``scale = (hi - lo) / (q_max - q_min)``,
  ``zero = round(clamp(q_min - lo / scale))``; a zero scale becomes the dtype's eps. Then
  ``q = clamp(x / scale + zero, q_min, q_max)`` rounded (int: half to even; FP8: cast to E4M3) and
  ``(q - zero) * scale``;
- ``dynamic: true``, ``strategy: group``: the same per token and group of ``group_size`` input
  features (FP8 block schemes: group 128);
- ``dynamic: false``, ``strategy: tensor``: the checkpoint's static ``input_scale`` (and
  ``input_zero_point``, asymmetric int8) per layer. The parts of a merged layer (q/k/v, gate/up)
  keep their own scales, as HF applies each module's: the input is quantized once per run of
  rows sharing a scale.

Rounding makes the result discontinuous: an input 1e-7 away (attention summed in another order) can
land on the other side of a rounding step and move an output by a quantization step. transformers'
own cached ``generate`` and its full forward differ that way now and then, so the tests compare
with its full forward, step by step.

Under tensor parallelism a row-parallel layer sees only its slice of the input features: per-token
scales are then per rank (as in vLLM); group and static scales are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.layers.quantization.sharding import checkpoint_rows, place

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class InputArgs:
    """The ``input_activations`` entry of a compressed-tensors config group."""

    num_bits: int
    type: str  # "int" | "float"
    strategy: str  # "token" | "group" (dynamic) | "tensor" (static)
    symmetric: bool
    dynamic: bool
    group_size: int | None = None

    @classmethod
    def from_config(cls, where: str, a: dict[str, Any]) -> "InputArgs":
        dynamic = a.get("dynamic", False)
        if dynamic not in (True, False):
            raise ValueError(f"{where}: input activations with dynamic={dynamic!r} are not supported; supported: "
                             "dynamic true (token, group) or false (tensor)")
        args = cls(num_bits=int(a.get("num_bits", 8)), type=str(a.get("type", "int")),
                   strategy=str(a.get("strategy") or "tensor"), symmetric=bool(a.get("symmetric", True)),
                   dynamic=bool(dynamic), group_size=a.get("group_size"))
        if args.num_bits != 8 or args.type not in ("int", "float"):
            raise ValueError(f"{where}: {args.num_bits}-bit {args.type} input activations are not supported; "
                             "supported: 8-bit int (W8A8) and 8-bit float (FP8 E4M3)")
        if args.type == "float" and not args.symmetric:
            raise ValueError(f"{where}: asymmetric FP8 input activations are not supported")
        if a.get("scale_dtype"):
            raise ValueError(f"{where}: input activations with a scale_dtype (MX formats) are not supported")
        supported = ("token", "group") if args.dynamic else ("tensor",)
        if args.strategy not in supported:
            raise ValueError(f"{where}: {'dynamic' if args.dynamic else 'static'} input activation strategy "
                             f"{args.strategy!r} is not supported; supported: {', '.join(supported)}")
        if args.strategy == "group" and not (isinstance(args.group_size, int) and args.group_size > 0):
            raise ValueError(f"{where}: group input activations need a positive group_size, got {args.group_size!r}")
        return args

    @property
    def q_range(self) -> tuple[float, float]:
        if self.type == "int":
            return -128.0, 127.0
        return -torch.finfo(FP8).max, torch.finfo(FP8).max


def _qparams(lo: torch.Tensor, hi: torch.Tensor, args: InputArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' ``calculate_qparams`` for 8-bit int / FP8 (scale in ``lo``'s dtype,
    zero point int8 / float8)."""
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    q_min, q_max = args.q_range
    bit_range = torch.tensor(q_max - q_min, dtype=torch.float32)
    if args.symmetric:
        top = torch.max(lo.abs(), hi.abs())
        scale = top / (bit_range.to(top.dtype) / 2)
        zero = torch.zeros(scale.shape, dtype=lo.dtype)
    else:
        scale = (hi - lo) / bit_range.to(hi.dtype)
        zero = torch.clamp(q_min - lo / scale, q_min, q_max)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    if args.type == "int":
        zero = torch.round(torch.clamp(zero, -128, 127)).to(torch.int8)
    else:
        zero = torch.clamp(zero, -torch.finfo(FP8).max, torch.finfo(FP8).max).to(FP8)
    return scale, zero


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, args: InputArgs) -> torch.Tensor:
    """compressed-tensors' ``_quantize_dequantize``: ``(round(clamp(x / scale + zero)) - zero) * scale``."""
    scaled = x / scale
    if zero is not None:
        scaled = scaled + zero.to(x.dtype)
    q_min, q_max = args.q_range
    q = torch.clamp(scaled, q_min, q_max)
    q = q.to(FP8).to(x.dtype) if args.type == "float" else torch.round(q)
    deq = q.to(scale.dtype)
    if zero is not None:
        deq = deq - zero.to(scale.dtype)
    return deq * scale


def quantize_dynamic(x: torch.Tensor, args: InputArgs) -> torch.Tensor:
    """``x`` [num_tokens, in] fake-quantized per token (``token``) or per token and group."""
    if args.strategy == "token":
        scale, zero = _qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)  # [num_tokens, 1]
        return _fake_quantize(x, scale, zero, args)
    if x.shape[-1] % args.group_size:
        raise ValueError(f"{x.shape[-1]} input features are not a multiple of the input group_size {args.group_size}")
    groups = x.unflatten(-1, (-1, args.group_size))  # [num_tokens, groups, group_size]
    scale, zero = _qparams(groups.amin(-1), groups.amax(-1), args)  # [num_tokens, groups]
    return _fake_quantize(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), args).flatten(-2).to(x.dtype)


def create_input_params(layer: nn.Module, args: InputArgs | None, output_size: int, dtype) -> None:
    """Static input scales (and asymmetric zero points): one per output row, ``[out, 1]`` (each
    merged part's own value on its rows)."""
    if args is None or args.dynamic:
        return
    layer.register_parameter("input_scale", nn.Parameter(torch.empty(output_size, 1, dtype=dtype),
                                                         requires_grad=False))
    if not args.symmetric:
        layer.register_parameter("input_zero_point", nn.Parameter(
            torch.empty(output_size, 1, dtype=torch.int8), requires_grad=False))


def load_input_param(layer: nn.Module, name: str, param, loaded: torch.Tensor, shard_id, dense) -> bool:
    """Load ``input_scale`` / ``input_zero_point`` (one value per checkpoint module) onto the part's
    rows; False for other tensors."""
    if name not in ("input_scale", "input_zero_point"):
        return False
    if loaded.numel() != 1:
        raise ValueError(f"static {name} has shape {tuple(loaded.shape)}, expected one value (strategy tensor)")
    rows = checkpoint_rows(layer, shard_id)
    place(layer, param, loaded.reshape(1, 1).expand(rows, 1), shard_id, dense, input_dim=None)
    return True


def load_input_or_weight(layer: nn.Module, name: str, param, loaded: torch.Tensor, shard_id, dense,
                         storage: torch.dtype, what: str) -> bool:
    """What every method keeping the checkpoint's ``[out, in]`` ``weight`` as ``storage`` values
    (FP8, int8; ``what`` names them in errors) loads alike: static input scales and zero points
    (``load_input_param``), and the weight, checked against the checkpoint part's shape and placed
    (split along its inputs on a row-parallel rank). False for other tensors (scales, a bias)."""
    if load_input_param(layer, name, param, loaded, shard_id, dense):
        return True
    if name != "weight":
        return False
    rows, cols = checkpoint_rows(layer, shard_id), layer.input_size
    if loaded.dtype != storage or tuple(loaded.shape) != (rows, cols):
        raise ValueError(f"{what} weight is {loaded.dtype} {tuple(loaded.shape)}, expected "
                         f"{str(storage).replace('torch.', '')} {(rows, cols)}")
    place(layer, param, loaded, shard_id, dense, input_dim=1)
    return True


def linear(layer: nn.Module, args: InputArgs | None, x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of the (fake-)quantized input and the dequantized ``weight`` [out, in]:
    [num_tokens, in] -> [num_tokens, out]."""
    if args is None:
        return F.linear(x, weight, bias)
    if args.dynamic:
        return F.linear(quantize_dynamic(x, args), weight, bias)
    scale = layer.input_scale[:, 0]  # [out]
    zero = getattr(layer, "input_zero_point", None)
    key = scale if zero is None else torch.stack((scale, zero[:, 0].to(scale.dtype)))
    key = key.reshape(-1, scale.shape[0])
    starts = [0] + (torch.nonzero((key[:, 1:] != key[:, :-1]).any(0)).flatten() + 1).tolist()
    outs = []
    for s, e in zip(starts, starts[1:] + [scale.shape[0]]):  # runs of rows sharing one input scale
        z = None if zero is None else zero[s, :1]
        xq = _fake_quantize(x, scale[s:s + 1], z if z is not None else torch.zeros(1, dtype=torch.int8), args)
        outs.append(F.linear(xq, weight[s:e], None if bias is None else bias[s:e]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
