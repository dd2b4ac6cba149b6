"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL with a new vision transformer.

What differs from ``qwen2_vl.py`` is only the vision side: blocks with RMSNorm and a gated SwiGLU
MLP (with bias), attention within windows of ``window_size`` pixels on most blocks and over the
whole image on ``fullatt_block_indexes``; the patches are permuted so that each window is
contiguous (in units of one 2x2 merge block) and the merged tokens are put back in the
processor's order after the ``merger`` (RMSNorm ``ln_q``, to ``out_hidden_size``). The Qwen2
language model with M-RoPE, the image positions (images only: ``tokens_per_second`` scales video
time), the processor contract and the checkpoint names are Qwen2-VL's.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.config import ModelConfig
from pageant.engine.layers.layernorm import RMSNorm
from pageant.engine.models import qwen2_vl
from pageant.engine.models.llava import activation
from pageant.engine.models.qwen2_vl import (Qwen2VLForConditionalGeneration, VisionAttention, VisionPatchRope,
                                             patch_merger)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Qwen2-VL's language-model fields (Qwen2 with ``mrope_section``)."""
    return dataclasses.replace(qwen2_vl.config_from_hf(hf), arch="qwen2_5_vl")


def window_index(grid: list[list[int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """The merge-block order that makes every ``window`` x ``window`` (merged tokens) window of each
    frame contiguous, and the patches in each non-empty window (windows at the right and bottom
    edges are cut short)."""
    order, lengths, base = [], [], 0
    for t, h, w in grid:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        ids = torch.full((t, nh * window, nw * window), -1, dtype=torch.long)  # -1: padding past the edge
        ids[:, :gh, :gw] = torch.arange(t * gh * gw).view(t, gh, gw) + base
        ids = ids.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)  # [windows, w*w]
        keep = ids >= 0
        order.append(ids[keep])
        lengths += [n * merge**2 for n in keep.sum(-1).tolist() if n]
        base += t * gh * gw
    return torch.cat(order), lengths  # [merge blocks], patches per window


class Qwen2_5_VisionBlock(nn.Module):
    """Pre-RMSNorm ViT block: rotary attention, then ``down(act(gate(x)) * up(x))`` (with bias)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str, ops: ModuleType):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim, 1e-6, ops), RMSNorm(dim, 1e-6, ops)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(dim, mlp_dim), nn.Linear(dim, mlp_dim)
        self.mlp.down_proj = nn.Linear(mlp_dim, dim)
        self.act = F.silu if act == "silu" else activation(act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        # x: [patches, dim]; cos/sin: [patches, 1, head_dim]; lengths: patches per window or frame
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        h = self.norm2(x)  # [patches, dim]
        return x + self.mlp.down_proj(self.act(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class Qwen2_5_VisionTransformer(VisionPatchRope):
    """Patch embedding, window/full-attention blocks, the 2x2 ``merger`` to ``out_hidden_size``."""

    def __init__(self, vc: dict[str, Any], ops: ModuleType):
        dim = vc["hidden_size"]
        super().__init__(vc, dim)
        self.full_attention = set(vc.get("fullatt_block_indexes", ()))
        self.window = vc.get("window_size", 112) // self.merge // self.patch  # in merged tokens
        if self.window < 1:
            raise ValueError(f"vision_config window_size {vc.get('window_size')} is smaller than one merge block "
                             f"({self.merge * self.patch} pixels)")
        act = vc.get("hidden_act", "silu")
        self.blocks = nn.ModuleList(Qwen2_5_VisionBlock(dim, self.num_heads, vc["intermediate_size"], act, ops)
                                    for _ in range(vc["depth"]))
        self.merger = patch_merger(dim, self.merge, vc["out_hidden_size"], RMSNorm(dim, 1e-6, ops))

    def forward(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        # pixel_values: [patches, channels * t_patch * patch * patch] -> [patches / merge^2, out_hidden_size]
        unit = self.merge**2
        order, windows = window_index(grid, self.merge, self.window)
        order = order.to(pixel_values.device)

        def permute(t: torch.Tensor) -> torch.Tensor:  # [patches, ...] in window order, merge blocks kept whole
            return t.view(-1, unit, *t.shape[1:])[order].flatten(0, 1)

        x = permute(self.embed(pixel_values))  # [patches, dim]
        cos, sin = (permute(e) for e in self._rotary(grid, x.device))  # [patches, 1, head_dim]
        frames = [h * w for t, h, w in grid for _ in range(t)]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_attention else windows)
        merged = self.merger.mlp(self.merger.ln_q(x).view(-1, self.dim * unit))  # [merge blocks, out], window order
        return merged[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL's vision transformer (``visual``) + Qwen2 with M-RoPE (``language_model``)."""

    @staticmethod
    def build_visual(vc: dict[str, Any], ops: ModuleType) -> nn.Module:
        return Qwen2_5_VisionTransformer(vc, ops)
