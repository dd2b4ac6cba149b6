"""``quant_method: fp8`` checkpoints (transformers' FineGrainedFP8, vLLM's ``Fp8Config``), CPU
dequant path.

config.json's ``quantization_config``: ``{"quant_method": "fp8", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}`` (DeepSeek-V3, Qwen3-FP8) and ``modules_to_not_convert``
(vLLM: ``ignored_layers``), matched as transformers does (from the start of the module name up to
a dot boundary, as a regex with that boundary, or as a suffix).

- ``weight_block_size`` given: ``weight`` float8_e4m3fn ``[N, K]`` and ``weight_scale_inv``
  ``[ceil(N / bn), ceil(K / bk)]``, see ``fp8_block.py``; only ``activation_scheme: dynamic``.
- ``weight_block_size`` null or absent (vLLM's reading; the tensors say which): per-tensor scales,
  ``weight`` float8_e4m3fn, ``weight_scale`` one float, and with ``activation_scheme: static`` an
  ``input_scale`` (one float), validated and kept on the layer for an FP8 GEMM.

Activations: on the CPU this path computes what transformers computes there — it has no FP8
kernels off the GPU and dequantizes FineGrainedFP8 weights to a float model (``dequantize=True``
forced), so activations stay in the model dtype (the dynamic per-token-group / static FP8 input
quantization of the GPU kernels is not emulated; a ``compressed-tensors`` FP8 checkpoint's
``input_activations``, which transformers does fake-quantize on the CPU, are).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from pageant.engine.layers.quantization import QuantConfig
from pageant.engine.layers.quantization.compressed_tensors import CompressedTensorsW8A16Fp8Method
from pageant.engine.layers.quantization.fp8_block import BlockFp8Method, check_blocks
from pageant.engine.layers.quantization.sharding import checkpoint_rows, param_name, place


def _skipped(name: str, patterns: list[str]) -> bool:
    """transformers' ``should_convert_module`` negated: ``name`` matches a pattern."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


class Fp8CheckpointConfig(QuantConfig):
    """A ``quant_method: fp8`` checkpoint: block-wise or per-tensor FP8 weights."""

    name = "fp8"

    def __init__(self, activation_scheme: str, block: tuple[int, int] | None, ignored: list[str]):
        self.activation_scheme, self.block, self.ignored = activation_scheme, block, ignored

    @classmethod
    def from_config(cls, qcfg: dict[str, Any]) -> "Fp8CheckpointConfig":
        scheme = str(qcfg.get("activation_scheme", "dynamic")).lower()
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 checkpoint activation_scheme {qcfg.get('activation_scheme')!r} is not supported; "
                             "supported: dynamic, static")
        block = qcfg.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, (list, tuple)) and len(block) == 2
                    and all(isinstance(b, int) and b > 0 for b in block)):
                raise ValueError(f"fp8 checkpoint weight_block_size must be two positive integers, got {block!r}")
            if scheme != "dynamic":
                raise ValueError("fp8 checkpoints with a weight_block_size support activation_scheme 'dynamic' only, "
                                 f"got {scheme!r}")
            block = (int(block[0]), int(block[1]))
        if str(qcfg.get("fmt") or "e4m3").lower() != "e4m3":
            raise ValueError(f"fp8 checkpoint fmt {qcfg.get('fmt')!r} is not supported; supported: e4m3")
        if (qcfg.get("scale_fmt") or "float") != "float":
            raise ValueError(f"fp8 checkpoint scale_fmt {qcfg.get('scale_fmt')!r} (power-of-two ue8m0 scales) is not "
                             "supported; supported: float")
        if qcfg.get("modules_to_convert"):
            raise ValueError("fp8 checkpoint modules_to_convert (FP8 embeddings) is not supported")
        ignored = qcfg.get("modules_to_not_convert") or qcfg.get("ignored_layers") or []
        return cls(scheme, block, [str(m) for m in ignored])

    def get_quant_method(self, layer: nn.Module, prefix: str, checkpoint_names: list[str]):
        skipped = {n: _skipped(n, self.ignored) for n in checkpoint_names}
        if len(set(skipped.values())) > 1:
            raise ValueError(f"fp8 modules_to_not_convert keeps only some parts of {prefix} "
                             f"({', '.join(checkpoint_names)}) dense; they are one merged layer here")
        if next(iter(skipped.values())):
            return None
        if self.block is not None:
            check_blocks(layer, prefix, self.block)
            return BlockFp8Method(self.block, "weight_scale_inv")
        return Fp8PerTensorMethod(static=self.activation_scheme == "static")


class Fp8PerTensorMethod(CompressedTensorsW8A16Fp8Method):
    """Per-tensor FP8 weights (one ``weight_scale`` per checkpoint module, stored per row) and,
    static activations, the ``input_scale`` per row (for an FP8 GEMM; the CPU path, like
    transformers', multiplies in the model dtype)."""

    def __init__(self, static: bool):
        super().__init__()
        self.static = static

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        super().create_weights(layer, input_size, output_size, dtype)
        if self.static:
            layer.register_parameter("input_scale", nn.Parameter(
                torch.empty(output_size, 1, dtype=dtype), requires_grad=False))

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = param_name(layer, param)
        if name in ("weight_scale", "input_scale") and loaded.numel() != 1:
            raise ValueError(f"fp8 {name} has shape {tuple(loaded.shape)}, expected one value (per-tensor scales; "
                             "a block-wise checkpoint has weight_block_size and weight_scale_inv)")
        if name == "input_scale":
            rows = checkpoint_rows(layer, shard_id)
            return place(layer, param, loaded.reshape(1, 1).expand(rows, 1), shard_id, dense, input_dim=None)
        super().weight_loader(layer, param, loaded, shard_id, dense)
