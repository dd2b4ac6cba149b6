"""Normalisation layers: Llama's RMSNorm (kernels), Gemma's ``(1 + w)`` RMSNorm, LayerNorm.

``RMSNorm`` and ``GemmaRMSNorm`` take an optional ``residual``: ``norm(x)`` alone, or
``residual = x + residual; return norm(residual), residual`` (the fused add of vLLM's layers).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``w * (x / rms(x))`` computed in float32 and cast back before the weight (Llama, Qwen, Mistral);
    the math lives in the kernels module (``ops.rms_norm`` / ``ops.fused_add_rms_norm``)."""

    def __init__(self, size: int, eps: float, ops: ModuleType):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # [n, size]
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``(x / rms(x)) * (1 + w)`` all in float32, then cast (weights stored as ``w``)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size), requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):  # [n, size]
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual


class LayerNorm(nn.Module):
    """LayerNorm with weight and (optionally) bias (GPT-NeoX, Falcon)."""

    def __init__(self, size: int, eps: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(size), requires_grad=False) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, size] -> [n, size]
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
