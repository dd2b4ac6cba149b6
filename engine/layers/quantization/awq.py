"""AWQ checkpoints (AutoAWQ's ``WQLinear_GEMM``, ``version: gemm``), 4-bit with zero points,
weight-only, CPU dequant path.

Read from config.json's ``quantization_config`` (``quant_method: awq``): ``bits`` (AutoAWQ:
``w_bit``) 4, ``group_size`` (``q_group_size``), ``zero_point`` true, ``version`` "gemm",
``modules_to_not_convert`` (checkpoint modules whose name contains one of them stay dense).
Checkpoint tensors per linear layer:

- ``qweight`` int32 ``[in, out / 8]``, packed along the *output* dim in AWQ's interleaved order:
  nibble ``k`` (bits ``4k``) of ``qweight[i, j]`` holds output ``8 j + [0, 2, 4, 6, 1, 3, 5, 7][k]``;
- ``qzeros`` int32 ``[in / group, out / 8]``, packed the same way (no offset);
- ``scales`` ``[in / group, out]`` (float16).

Dequantized: ``W[o, i] = (q[i, o] - zero[i // group, o]) * scale[i // group, o]``, ``y = x @ W.T``.
In memory the layout of ``gptq.py`` (qweight re-packed along the input dim, ``[out, in / 8]``,
scales ``[out, groups]``, zeros unpacked uint8 ``[out, groups]``), so merged shards land by rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pageant.engine.layers.quantization import QuantConfig
from pageant.engine.layers.quantization.gptq import PackedWNA16Method, _int, pack_int32, unpack_int32
from pageant.engine.layers.quantization.sharding import check_input_split

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output (within 8) held by nibble k
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble holding output o (within 8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """``[rows, cols / 8]`` int32 in AWQ's order -> ``[rows, cols]`` uint8 in natural column order."""
    nibbles = unpack_int32(packed, 4).unflatten(-1, (-1, 8))  # [rows, words, nibble]
    return nibbles[..., list(AWQ_REVERSE_ORDER)].flatten(-2)


class AwqMethod(PackedWNA16Method):
    fmt = "AWQ"
    packed_out = ("qweight", "qzeros")

    def convert(self, name, loaded, rows, cols):
        groups = self.groups(cols)
        if name == "qweight":
            self._check("qweight", loaded, (cols, rows // 8),
                        note=f" ({cols} input x {rows} output 4-bit values, 8 per int32 along the output dim)")
            return pack_int32(unpack_awq(loaded).t(), 4)  # [rows, cols / 8], packed along the input dim
        if name == "qzeros":
            self._check("qzeros", loaded, (groups, rows // 8),
                        note=f" ({groups} groups x {rows} outputs, 8 per int32)")
            return unpack_awq(loaded).t()
        if name == "scales":
            self._check("scales", loaded, (groups, rows), dtype=None, note=f" (group_size {self.group_size})")
            if not loaded.is_floating_point():
                raise ValueError(f"AWQ scales are {loaded.dtype}, expected a float dtype")
            return loaded.t()
        raise ValueError(f"unexpected AWQ tensor {name!r}")


class AwqConfig(QuantConfig):
    name = "awq"

    def __init__(self, bits: int, group_size: int, modules_to_not_convert: list[str]):
        self.bits, self.group_size, self.modules_to_not_convert = bits, group_size, modules_to_not_convert

    @classmethod
    def from_config(cls, qcfg: dict[str, Any]) -> "AwqConfig":
        version = str(qcfg.get("version") or "gemm").lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {qcfg.get('version')!r} is not supported; supported: 'gemm'")
        bits = _int(qcfg, "AWQ", "bits", "w_bit")
        if bits != 4:
            raise ValueError(f"AWQ bits {bits} is not supported; supported: 4")
        group_size = _int(qcfg, "AWQ", "group_size", "q_group_size")
        if group_size <= 0:
            raise ValueError(f"AWQ group_size must be positive, got {group_size}")
        if not qcfg.get("zero_point", True):
            raise ValueError("AWQ zero_point false (symmetric AWQ) is not supported; supported: zero_point true")
        return cls(bits, group_size, list(qcfg.get("modules_to_not_convert") or []))

    def get_quant_method(self, layer: nn.Module, prefix: str, checkpoint_names: list[str]):
        dense = {n: any(m in n for m in self.modules_to_not_convert) for n in checkpoint_names}
        if len(set(dense.values())) > 1:
            raise ValueError(f"AWQ modules_to_not_convert keeps only some parts of {prefix} "
                             f"({', '.join(checkpoint_names)}) dense; they are one merged layer here")
        if next(iter(dense.values())):
            return None
        cols = layer.input_size_per_partition
        check_input_split(layer, prefix, self.group_size, f"AWQ group_size {self.group_size}")
        if cols % self.group_size:
            raise ValueError(f"{prefix}: {cols} input features are not a multiple of AWQ group_size {self.group_size}")
        return AwqMethod(self.bits, self.group_size)
