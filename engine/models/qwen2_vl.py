"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): its vision transformer + a Qwen2 language model.

The vision transformer embeds 14x14 (x2 frames) patches, runs ViT blocks with 2-D rotary
positions (attention within each image), and merges each 2x2 block of patches into one token
(``PatchMerger``). The language model is the Llama family's Qwen2 (``llama.py``) with M-RoPE
(``MRotaryEmbedding``): image tokens get (t, h, w) positions, text continues after the image's
largest extent (``mm_rope_positions``, as ``transformers``' ``get_rope_index``).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.config import ModelConfig
from pageant.engine.layers.parallel import SINGLE, ParallelState
from pageant.engine.layers.rotary import MRotaryEmbedding
from pageant.engine.models import llama
from pageant.engine.models.llava import LlavaForConditionalGeneration, activation


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The Qwen2 language model's fields; ``mrope_section`` goes to ``family_options``."""
    text = dict(hf.get("text_config") or hf)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    section = tuple(rope.pop("mrope_section", ()))
    if not section:
        raise ValueError("a Qwen2-VL config needs rope mrope_section")
    rope.pop("type", None)
    rope["rope_type"] = "default" if rope.get("rope_type") in (None, "mrope", "default") else rope["rope_type"]
    text.update(rope_parameters=rope, rope_scaling=None, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    cfg = llama.config_from_hf(text)
    return dataclasses.replace(cfg, arch="qwen2_vl", architecture=hf["architectures"][0], raw=hf,
                               family_options=(("mrope_section", section),))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    """Fused-qkv multi-head attention with 2-D rotary q/k, bidirectional within each span of ``lengths``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        # x: [patches, dim]; cos/sin: [patches, 1, head_dim]; lengths: patches per span (attention stays within)
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [patches, heads, d] each
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        outs = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))
                for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]  # [heads, len, d]
        return self.proj(torch.cat([o.transpose(0, 1) for o in outs]).reshape(n, -1))  # [patches, dim]


class VisionBlock(nn.Module):
    """Pre-norm ViT block with fused qkv and 2-D rotary q/k."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        # x: [patches, dim]; cos/sin: [patches, 1, head_dim]; lengths: patches per image (attention stays within)
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.norm2(x))))


def patch_merger(dim: int, merge: int, out_dim: int, norm: nn.Module) -> nn.Module:
    """``merger``: ``norm`` (``ln_q``) per patch, then each merge x merge block's patches concatenated
    through ``mlp`` (Linear, GELU, Linear) to ``out_dim``."""
    merged = dim * merge**2
    merger = nn.Module()
    merger.ln_q = norm
    merger.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, out_dim))
    return merger


class VisionPatchRope(nn.Module):
    """The parts Qwen2-VL's and Qwen2.5-VL's vision transformers share: the Conv3d ``patch_embed``
    (``embed``) and the 2-D rotary cos/sin of every patch (``_rotary``)."""

    def __init__(self, vc: dict[str, Any], dim: int):
        super().__init__()
        self.merge = vc.get("spatial_merge_size", 2)
        self.num_heads, self.dim = vc["num_heads"], dim
        self.channels, self.t_patch, self.patch = vc.get("in_channels", 3), vc.get("temporal_patch_size", 2), vc["patch_size"]
        self.theta = float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.patch_embed = nn.Module()
        kernel = (self.t_patch, self.patch, self.patch)
        self.patch_embed.proj = nn.Conv3d(self.channels, dim, kernel, kernel, bias=False)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [patches, channels * t_patch * patch * patch] -> [patches, dim]
        w = self.patch_embed.proj.weight
        x = pixel_values.to(w.dtype).view(-1, self.channels, self.t_patch, self.patch, self.patch)
        return self.patch_embed.proj(x).view(-1, self.dim)

    def _rotary(self, grid: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        m, pos = self.merge, []
        for t, h, w in grid:  # (h, w) of every patch, in the processor's 2x2-block-major order
            hp, wp = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            shape = (h // m, m, w // m, m)
            hw = torch.stack([hp.reshape(shape).transpose(1, 2).flatten(), wp.reshape(shape).transpose(1, 2).flatten()], -1)
            pos.append(hw.repeat(t, 1))
        pos = torch.cat(pos).to(device)  # [patches, 2]
        spatial = self.dim // self.num_heads // 2
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device) / spatial))
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [patches, head_dim / 2]: h freqs then w freqs
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [patches, 1, head_dim]
        return emb.cos(), emb.sin()


class Qwen2VisionTransformer(VisionPatchRope):
    """Patch embedding, ``depth`` blocks, then the 2x2 ``merger`` to the text width."""

    def __init__(self, vc: dict[str, Any]):
        dim = vc["embed_dim"]
        super().__init__(vc, dim)
        mlp_dim = int(dim * vc.get("mlp_ratio", 4))
        self.blocks = nn.ModuleList(VisionBlock(dim, self.num_heads, mlp_dim, vc.get("hidden_act", "quick_gelu"))
                                    for _ in range(vc["depth"]))
        self.merger = patch_merger(dim, self.merge, vc["hidden_size"], nn.LayerNorm(dim, eps=1e-6))

    def forward(self, pixel_values: torch.Tensor, grid: list[list[int]]) -> torch.Tensor:
        # pixel_values: [patches, channels * t_patch * patch * patch] -> [patches / merge^2, text hidden]
        x = self.embed(pixel_values)  # [patches, dim]
        cos, sin = self._rotary(grid, x.device)
        lengths = [h * w_ for t, h, w_ in grid for _ in range(t)]  # attention per frame of each image
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return self.merger.mlp(self.merger.ln_q(x).view(-1, self.dim * self.merge**2))


class Qwen2VLForConditionalGeneration(LlavaForConditionalGeneration):
    """Vision transformer (``visual``) + ``LlamaForCausalLM`` as Qwen2 with M-RoPE (``language_model``)."""

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        if parallel.tp_size * parallel.pp_size > 1:
            raise ValueError("vision-language models run on one process: tensor/pipeline_parallel_size must be 1")
        super(LlavaForConditionalGeneration, self).__init__(config, ops, max_position, parallel)
        self.visual = self.build_visual(config.raw["vision_config"], ops)
        self.language_model = llama.LlamaForCausalLM(config, ops, max_position, parallel)
        rotary = MRotaryEmbedding(config.head_dim, config.rotary_dim or config.head_dim, max_position, config.rope, ops,
                                  config.option("mrope_section"), max_position_embeddings=config.max_position_embeddings)
        for layer in self.language_model.model.layers:
            layer.self_attn.rotary_emb = rotary

    @staticmethod
    def build_visual(vc: dict[str, Any], ops: ModuleType) -> nn.Module:
        """The vision transformer of ``vision_config`` (Qwen2.5-VL overrides this)."""
        return Qwen2VisionTransformer(vc)

    @staticmethod
    def mm_prompt_placeholder(image_token: str) -> str:
        return f"<|vision_start|>{image_token}<|vision_end|>"

    @staticmethod
    def mm_split_items(out, num_images: int, hf: dict[str, Any]) -> tuple[list[dict], list[int]]:
        """Per image: its patches ``[t*h*w, patch_dim]`` and ``image_grid_thw`` ``[1, 3]``; tokens = t*h*w / 4."""
        grid = out["image_grid_thw"]  # [images, 3]
        sizes = grid.prod(-1).tolist()
        merge = hf["vision_config"].get("spatial_merge_size", 2)
        patches = out["pixel_values"].split(sizes)
        return ([{"pixel_values": p, "image_grid_thw": grid[i : i + 1]} for i, p in enumerate(patches)],
                [s // merge**2 for s in sizes])

    @staticmethod
    def mm_rope_positions(ids: list[int], items: list, hf: dict[str, Any]) -> tuple[np.ndarray, int]:
        """``[3, len(ids)]`` M-RoPE positions and the delta of the tokens after the prompt."""
        merge = hf["vision_config"].get("spatial_merge_size", 2)
        parts, cursor, current = [], 0, 0
        for it in items:
            text = it.offset - cursor
            parts.append(np.repeat(np.arange(current, current + text)[None], 3, axis=0))
            current += text
            t, h, w = (int(x) for x in it.data["image_grid_thw"][0])
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
            parts.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(h, w) // merge
            cursor = it.end
        parts.append(np.repeat(np.arange(current, current + len(ids) - cursor)[None], 3, axis=0))
        positions = np.concatenate(parts, axis=1).astype(np.int64)  # [3, len(ids)]
        return positions, int(positions.max()) + 1 - len(ids)

    def encode_images(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """One vision run over the step's images -> per image ``[t*h*w / 4, hidden]``."""
        grid = [[int(x) for x in it["image_grid_thw"][0]] for it in items]
        pixels = torch.cat([it["pixel_values"] for it in items]).to(self.visual.patch_embed.proj.weight.device)
        merged = self.visual(pixels, grid)  # [sum tokens, hidden]
        return list(merged.split([t * h * w // self.visual.merge**2 for t, h, w in grid]))

    _RENAMES = ((r"^model\.language_model\.", "language_model.model."), (r"^model\.visual\.", "visual."),
                (r"^model\.(layers|embed_tokens|norm)\b", r"language_model.model.\1"),
                (r"^lm_head\.", "language_model.lm_head."))
