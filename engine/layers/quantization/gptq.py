"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum, ``checkpoint_format`` "gptq" = v1), weight-only,
CPU dequant path.

Read from config.json's ``quantization_config`` (``quant_method: gptq``): ``bits`` 4 or 8,
``group_size`` (-1: one group per output channel), ``desc_act`` (act-order: ``g_idx`` is then a
permutation pattern), ``sym``. Checkpoint tensors per linear layer (AutoGPTQ's ``QuantLinear``):

- ``qweight`` int32 ``[in * bits / 32, out]``, packed along the *input* dim: input row
  ``j * (32 / bits) + k`` of output column ``o`` at bits ``k * bits`` of ``qweight[j, o]``;
- ``qzeros`` int32 ``[groups, out * bits / 32]``, packed the same way along the *output* dim, stored
  as ``zero - 1`` (v1; the true zero is ``(stored + 1) mod 2**bits``, as AutoGPTQ dequantizes);
- ``scales`` ``[groups, out]`` (float16); ``g_idx`` int32 ``[in]``: the group of each input row.

Dequantized: ``W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scale[g_idx[i], o]`` and ``y = x @ W.T``.

In memory (one layout shared with ``awq.py``, so the shards of merged q/k/v and gate/up land by
output rows through the layer's dense loader): ``qweight`` int32 ``[out, in * bits / 32]`` (the
checkpoint's, transposed: still packed along the input dim), ``scales`` ``[out, groups]``,
``qzeros`` uint8 ``[out, groups]`` (unpacked true zeros) and ``g_idx`` int32 ``[in]`` (one for the
whole layer: merged shards must agree). ``checkpoint_format`` "gptq_v2" / marlin are refused.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from pageant.engine.layers.quantization import QuantConfig
from pageant.engine.layers.quantization.compressed_tensors import _param_name
from pageant.engine.layers.quantization.sharding import check_input_split, checkpoint_rows, is_row_split, place


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., words]`` int32 -> ``[..., words * 32 / bits]`` uint8: value ``k`` of word ``j`` is
    element ``j * (32 / bits) + k``, at bits ``k * bits`` (little-endian, unsigned)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2).to(torch.uint8)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``unpack_int32``: ``[..., n]`` integers in ``[0, 2**bits)`` -> int32
    ``[..., n * bits / 32]`` (``n`` a multiple of ``32 / bits``)."""
    v = values.to(torch.int64).unflatten(-1, (-1, 32 // bits))
    words = (v << torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _int(qcfg: dict[str, Any], where: str, *names: str) -> int:
    for n in names:
        if qcfg.get(n) is not None:
            try:
                return int(qcfg[n])
            except (TypeError, ValueError):
                raise ValueError(f"{where} {n} must be an integer, got {qcfg[n]!r}") from None
    from pageant.engine.layers.quantization import LOADABLE_QUANTIZATION

    raise ValueError(f"checkpoint quantization_config has quant_method {qcfg.get('quant_method')!r} but no "
                     f"{names[0]!r} setting, so it is not a valid {where} config; supported: "
                     f"{', '.join(LOADABLE_QUANTIZATION)}")


class PackedWNA16Method:
    """Weight-only int4 / int8 with per-group scales and zero points, stored packed in the layout
    described in the module docstring; dequantized per call on the CPU (no fused kernel yet).
    Subclasses turn their checkpoint's tensors into that layout (``convert``)."""

    fmt = ""
    packed_out: tuple[str, ...] = ("qzeros",)  # checkpoint tensors packed along the output dim

    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def groups(self, input_size: int) -> int:
        return 1 if self.group_size == -1 else -(-input_size // self.group_size)

    def split_groups(self, layer) -> bool:
        """Whether this rank holds only its input slice's groups (row-parallel, ``tp_size > 1``);
        otherwise scales and zeros are whole (per channel, or act-order groups spread over K)."""
        return is_row_split(layer) and self.group_size != -1

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        groups = self.groups(input_size if self.split_groups(layer) or not is_row_split(layer) else layer.input_size)
        layer.register_parameter("qweight", nn.Parameter(
            torch.empty(output_size, input_size // self.pack, dtype=torch.int32), requires_grad=False))
        layer.register_parameter("scales", nn.Parameter(
            torch.empty(output_size, groups, dtype=dtype), requires_grad=False))
        layer.register_parameter("qzeros", nn.Parameter(
            torch.empty(output_size, groups, dtype=torch.uint8), requires_grad=False))

    def _check(self, what: str, loaded: torch.Tensor, shape: tuple, dtype: torch.dtype | None = torch.int32,
               note: str = "") -> None:
        if (dtype is not None and loaded.dtype != dtype) or tuple(loaded.shape) != shape:
            want = f"{str(dtype).replace('torch.', '')} " if dtype is not None else ""
            raise ValueError(f"{self.fmt} {what} is {str(loaded.dtype).replace('torch.', '')} {tuple(loaded.shape)}, "
                             f"expected {want}{shape}{note}")

    def convert(self, name: str, loaded: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        raise NotImplementedError

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = _param_name(layer, param)
        rows, cols = checkpoint_rows(layer, shard_id), layer.input_size  # the checkpoint's spans every rank
        if name == "bias":
            return place(layer, param, loaded, shard_id, dense, input_dim=None)
        if name in self.packed_out and rows % self.pack:
            raise ValueError(f"{self.fmt}: {rows} output features are not a multiple of {self.pack} "
                             f"({self.bits}-bit values packed {self.pack} per int32 along the output dim)")
        split = name == "qweight" or self.split_groups(layer)
        place(layer, param, self.convert(name, loaded, rows, cols), shard_id, dense, input_dim=1 if split else None)

    def weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        """The layer's ``[out, in]`` weight in ``dtype``: ``(q - zero) * scale`` per group."""
        scales = layer.scales
        q = unpack_int32(layer.qweight, self.bits).to(scales.dtype)  # [out, in]
        zeros = layer.qzeros.to(scales.dtype)
        g_idx = getattr(layer, "g_idx", None)
        if g_idx is not None:
            g = g_idx.long()
            return ((q - zeros[:, g]) * scales[:, g]).to(dtype)
        out, cols = q.shape
        q = q.view(out, scales.shape[1], -1)  # [out, groups, group size]
        return ((q - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).view(out, cols).to(dtype)

    dequantize = weight

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from pageant.engine.layers.quantization import gemm  # Triton dequant GEMM on CUDA, this dequant on the CPU

        return gemm.int_weight_gemm(x, layer.qweight, layer.scales, bits=self.bits, group_size=self.group_size,
                                    zeros=layer.qzeros, g_idx=getattr(layer, "g_idx", None), bias=bias)


class GptqMethod(PackedWNA16Method):
    fmt = "GPTQ"

    def __init__(self, bits: int, group_size: int, desc_act: bool = False):
        super().__init__(bits, group_size)
        self.desc_act = desc_act
        self._g_idx_from: object = None  # the shard g_idx was first loaded from (merged shards must agree)

    def split_groups(self, layer) -> bool:  # act-order: any input row may be in any group (vLLM's rule)
        return super().split_groups(layer) and not self.desc_act

    def create_weights(self, layer, input_size, output_size, dtype) -> None:
        super().create_weights(layer, input_size, output_size, dtype)
        layer.register_parameter("g_idx", nn.Parameter(
            torch.empty(input_size, dtype=torch.int32), requires_grad=False))

    def convert(self, name, loaded, rows, cols):
        groups = self.groups(cols)
        if name == "qweight":
            self._check("qweight", loaded, (cols // self.pack, rows),
                        note=f" ({cols} input x {rows} output {self.bits}-bit values, {self.pack} per int32 "
                             "along the input dim)")
            return loaded.t()
        if name == "qzeros":
            self._check("qzeros", loaded, (groups, rows // self.pack),
                        note=f" ({groups} groups x {rows} outputs, {self.pack} per int32)")
            stored = unpack_int32(loaded, self.bits).t()  # [rows, groups]
            return ((stored.to(torch.int16) + 1) & ((1 << self.bits) - 1)).to(torch.uint8)  # v1: zero - 1 stored
        if name == "scales":
            self._check("scales", loaded, (groups, rows), dtype=None,
                        note=f" (group_size {self.group_size})")
            if not loaded.is_floating_point():
                raise ValueError(f"GPTQ scales are {loaded.dtype}, expected a float dtype")
            return loaded.t()
        raise ValueError(f"unexpected GPTQ tensor {name!r}")

    def weight_loader(self, layer, param, loaded, shard_id, dense) -> None:
        if _param_name(layer, param) != "g_idx":
            return super().weight_loader(layer, param, loaded, shard_id, dense)
        cols = layer.input_size  # the checkpoint's, all ranks'
        self._check("g_idx", loaded, (cols,), dtype=None)
        if loaded.is_floating_point() or loaded.is_complex():
            raise ValueError(f"GPTQ g_idx is {loaded.dtype}, expected an integer dtype")
        groups = self.groups(cols)
        if cols and (int(loaded.min()) < 0 or int(loaded.max()) >= groups):
            raise ValueError(f"GPTQ g_idx has groups outside [0, {groups}) (group_size {self.group_size})")
        if is_row_split(layer):  # this rank's input rows; their groups counted from its first one
            n, rank = layer.input_size_per_partition, layer.parallel.tp_rank
            loaded = loaded.narrow(0, rank * n, n)
            if self.split_groups(layer):
                local = self.groups(n)
                loaded = loaded - rank * local
                if int(loaded.min()) < 0 or int(loaded.max()) >= local:
                    raise ValueError(f"GPTQ g_idx puts input rows of rank {rank} in groups of another rank; "
                                     "without desc_act the groups must follow the input order")
        if self._g_idx_from is None:
            param.data.copy_(loaded.to(torch.int32))
            self._g_idx_from = shard_id if shard_id is not None else "whole"
        elif not torch.equal(param.data, loaded.to(torch.int32)):
            raise ValueError(f"GPTQ g_idx of shard {shard_id!r} differs from that of shard {self._g_idx_from!r}; "
                             "the parts of a merged layer share their input rows, so they must have one g_idx")


class GptqConfig(QuantConfig):
    name = "gptq"

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool):
        self.bits, self.group_size, self.desc_act, self.sym = bits, group_size, desc_act, sym

    @classmethod
    def from_config(cls, qcfg: dict[str, Any]) -> "GptqConfig":
        bits = _int(qcfg, "GPTQ", "bits")
        if bits not in (4, 8):
            raise ValueError(f"GPTQ bits {bits} is not supported; supported: 4, 8")
        group_size = _int(qcfg, "GPTQ", "group_size")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"GPTQ group_size must be positive or -1 (per channel), got {group_size}")
        fmt = str(qcfg.get("checkpoint_format") or "gptq").lower()
        if qcfg.get("is_marlin_format") or fmt != "gptq":
            raise ValueError(f"GPTQ checkpoint_format {'marlin' if qcfg.get('is_marlin_format') else fmt!r} is not "
                             "supported; supported: 'gptq' (v1, AutoGPTQ's zero - 1 zero points)")
        if qcfg.get("lm_head"):
            raise ValueError("GPTQ lm_head quantization (lm_head: true) is not supported")
        if qcfg.get("dynamic"):
            raise ValueError("GPTQ per-module 'dynamic' overrides are not supported")
        if qcfg.get("modules_in_block_to_quantize"):
            raise ValueError("GPTQ modules_in_block_to_quantize (partly quantized blocks) is not supported")
        return cls(bits, group_size, bool(qcfg.get("desc_act", False)), bool(qcfg.get("sym", True)))

    def get_quant_method(self, layer, prefix, checkpoint_names):
        cols = layer.input_size_per_partition
        check_input_split(layer, prefix, 32 // self.bits, f"{32 // self.bits} ({self.bits}-bit values packed per int32)")
        if cols % (32 // self.bits):
            raise ValueError(f"{prefix}: {cols} input features are not a multiple of {32 // self.bits} "
                             f"(GPTQ packs {32 // self.bits} {self.bits}-bit values per int32)")
        if self.group_size != -1 and not self.desc_act:
            check_input_split(layer, prefix, self.group_size, f"group_size {self.group_size}")
        return GptqMethod(self.bits, self.group_size, self.desc_act)
