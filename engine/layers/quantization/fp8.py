"""Online FP8 (``EngineConfig.quantization="fp8"``): a float checkpoint's linear weights are
quantized to FP8 E4M3 as they load, one scale per output channel (embeddings and lm_head stay
dense, they are not linear layers here).

Per row: ``scale = amax(|w|) / 448`` (E4M3's largest value; a zero row gets float eps), then
``round_to_nearest_e4m3(clamp(w / scale, -448, 448))`` — compressed-tensors' FP8 channel scheme
(``calculate_qparams`` + ``quantize``), so the stored bytes and scales equal the same checkpoint
quantized offline by it. Computed in the checkpoint tensor's dtype, as compressed-tensors does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pageant.engine.layers.quantization import QuantConfig
from pageant.engine.layers.quantization.compressed_tensors import CompressedTensorsW8A16Fp8Method, _param_name
from pageant.engine.layers.quantization.sharding import place

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float -> (``[out, in]`` float8_e4m3fn, ``[out, 1]`` scale in the weight's dtype)."""
    amax = weight.abs().amax(dim=1, keepdim=True)
    scale = amax / torch.tensor(FP8_MAX, dtype=weight.dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    q = torch.clamp(weight / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Fp8OnlineConfig(QuantConfig):
    """``quantization="fp8"`` on a float checkpoint: every linear layer to FP8 per output channel."""

    name = "fp8"
    online = True

    def get_quant_method(self, layer, prefix, checkpoint_names):
        return Fp8OnlineLinearMethod()


class Fp8OnlineLinearMethod(CompressedTensorsW8A16Fp8Method):
    """The FP8 weight-only method with its scales computed on load (a buffer: the checkpoint has none)."""

    def create_weights(self, layer, input_size: int, output_size: int, dtype: torch.dtype | None) -> None:
        layer.register_parameter("weight", nn.Parameter(
            torch.empty(output_size, input_size, dtype=torch.float8_e4m3fn), requires_grad=False))
        layer.register_buffer("weight_scale", torch.empty(output_size, 1, dtype=dtype))

    def weight_loader(self, layer, param, loaded: torch.Tensor, shard_id, dense: Callable) -> None:
        name = _param_name(layer, param)
        if name == "weight" and loaded.dtype != torch.float8_e4m3fn:
            if not loaded.is_floating_point():
                raise ValueError(f"quantization='fp8' needs a float weight, got {loaded.dtype}")
            q, scale = quantize_fp8_per_channel(loaded)  # per (whole) row: shards quantize independently
            place(layer, param, q, shard_id, dense, input_dim=1)
            place(layer, layer.weight_scale, scale, shard_id, dense, input_dim=None)
            return
        place(layer, param, loaded, shard_id, dense, input_dim=1 if name == "weight" else None)
