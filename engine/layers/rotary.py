"""Rotary position embeddings: the frequency tables of every supported scaling, and the layer.

Tables are computed in the same float32 steps as ``transformers.modeling_rope_utils``, so cos/sin
equal Hugging Face's bit for bit. Scalings (``RopeConfig.rope_type``):

- ``default``, ``linear`` (positions divided by ``factor``), ``llama3`` (Llama 3.1's smooth band);
- ``dynamic`` (NTK-aware): transformers rescales the base as the batch grows past
  ``max_position_embeddings``; a paged engine needs one table, so the base is fixed for the table's
  length (vLLM's choice). Within ``max_position_embeddings`` that is the unscaled table, i.e. HF's;
- ``yarn``: the blended inverse frequencies and the ``attention_factor`` on cos and sin;
- ``longrope`` (Phi-3's "su"): ``short_factor`` for positions below
  ``original_max_position_embeddings`` and ``long_factor`` from there on (per position, as vLLM;
  transformers switches the whole batch once a sequence is longer), both with the attention factor.

The table layout is ``[max_position, rotary_dim]``: cos of the ``rotary_dim / 2`` frequencies in the
first half, sin in the second (what ``pageant.kernels`` expects).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from pageant.engine.config import RopeConfig


def _exponents(rotary_dim: int) -> torch.Tensor:  # [rotary_dim / 2] float32: 2i / rotary_dim
    return torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    if old_len is None:
        raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.scale, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.scale + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(rope: RopeConfig, rotary_dim: int, max_position_embeddings: int) -> torch.Tensor:
    base, dim = rope.theta, rotary_dim
    original = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


def inv_frequencies(rope: RopeConfig, rotary_dim: int, max_position_embeddings: int, max_position: int,
                    long: bool = False) -> torch.Tensor:  # [rotary_dim / 2] float32
    """The inverse frequencies; ``long`` picks longrope's long factors."""
    kind = rope.rope_type
    if kind == "yarn":
        return _yarn(rope, rotary_dim, max_position_embeddings)
    if kind == "longrope":
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        if factors.numel() != rotary_dim // 2:
            raise ValueError(f"longrope factors have {factors.numel()} entries, expected {rotary_dim // 2}")
        return 1.0 / (factors * rope.theta ** _exponents(rotary_dim))
    base = rope.theta
    if kind == "dynamic":
        seq_len = max(max_position, max_position_embeddings)
        base = base * ((rope.scale * seq_len / max_position_embeddings) - (rope.scale - 1)) ** (
            rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / (base ** _exponents(rotary_dim))
    if kind == "linear":
        return inv_freq / rope.scale
    if kind == "llama3":
        return _llama3(rope, inv_freq)
    return inv_freq


def attention_factor(rope: RopeConfig, max_position_embeddings: int) -> float:
    """The factor YaRN and longrope put on cos and sin (1.0 for the other scalings)."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    if rope.rope_type == "yarn":
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        original = rope.original_max_position_embeddings or max_position_embeddings
        factor = rope.factor if rope.factor is not None else max_position_embeddings / original
        if rope.mscale and rope.mscale_all_dim:
            return float(mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim))
        return mscale(factor)
    if rope.rope_type == "longrope":
        original = rope.original_max_position_embeddings or max_position_embeddings
        factor = rope.factor if rope.factor is not None else max_position_embeddings / original
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0


def cos_sin_cache(rope: RopeConfig, rotary_dim: int, max_position: int,
                  max_position_embeddings: int | None = None) -> torch.Tensor:  # [max_position, rotary_dim]
    """cos | sin of every position's angles, times the scaling's attention factor."""
    mpe = max_position_embeddings or max_position
    positions = torch.arange(max_position, dtype=torch.float32)  # [max_position]
    freqs = torch.outer(positions, inv_frequencies(rope, rotary_dim, mpe, max_position))  # [P, rotary_dim / 2]
    if rope.rope_type == "longrope":
        original = rope.original_max_position_embeddings or mpe
        if max_position > original:
            long = torch.outer(positions, inv_frequencies(rope, rotary_dim, mpe, max_position, long=True))
            freqs[original:] = long[original:]
    scale = attention_factor(rope, mpe)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    return cache * scale if scale != 1.0 else cache


class RotaryEmbedding(nn.Module):
    """Rotates the first ``rotary_dim`` features of every q/k head (all of them unless partial).

    ``is_neox_style``: pairs are (i, i + rotary_dim / 2) ("rotate half": Llama, NeoX, Falcon, ...);
    otherwise GPT-J's interleaved pairs (2i, 2i + 1). The NeoX case runs ``ops.rotary_embedding``.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, rope: RopeConfig, ops: ModuleType, *,
                 is_neox_style: bool = True, max_position_embeddings: int | None = None):
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim, self.rotary_dim, self.max_position = head_dim, rotary_dim, max_position
        self.rope, self.ops, self.is_neox_style = rope, ops, is_neox_style
        self.max_position_embeddings = max_position_embeddings or max_position
        self.register_buffer("cos_sin_cache", self._table(), persistent=False)

    def _table(self) -> torch.Tensor:
        return cos_sin_cache(self.rope, self.rotary_dim, self.max_position, self.max_position_embeddings)

    def init_buffers(self, device: torch.device) -> None:
        """Recompute the table on ``device`` (after the model was built on the meta device)."""
        self.cos_sin_cache = self._table().to(device)

    def forward(self, positions: torch.Tensor,  # [num_tokens]
                q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
                k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rd = self.rotary_dim
        if self.is_neox_style and rd == self.head_dim:
            return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache)
        if self.is_neox_style:
            q_rot, k_rot = self.ops.rotary_embedding(positions, q[..., :rd].contiguous(), k[..., :rd].contiguous(),
                                                     self.cos_sin_cache)
        else:
            q_rot, k_rot = self._gptj(positions, q[..., :rd]), self._gptj(positions, k[..., :rd])
        return torch.cat((q_rot, q[..., rd:]), dim=-1), torch.cat((k_rot, k[..., rd:]), dim=-1)

    def _gptj(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # [n, h, rd] -> same
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # [n, rd / 2] each
        cos, sin = cos[:, None, :], sin[:, None, :]
        x32 = x.float()
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [n, h, rd / 2, 2]
        return out.flatten(-2).to(x.dtype)


class MRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (Qwen2-VL): the ``rotary_dim / 2`` frequencies are cut into ``mrope_section`` chunks;
    chunk ``i`` rotates by the position on axis ``i % 3`` (temporal, height, width). ``positions``
    ``[3, num_tokens]`` select them; 1-D positions (text only: the same on every axis) are plain RoPE."""

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, rope: RopeConfig, ops: ModuleType,
                 mrope_section: tuple[int, ...], **kwargs):
        super().__init__(head_dim, rotary_dim, max_position, rope, ops, **kwargs)
        if sum(mrope_section) != rotary_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to rotary_dim / 2 = {rotary_dim // 2}")
        self.mrope_section = tuple(mrope_section)

    def forward(self, positions: torch.Tensor,  # [num_tokens] or [3, num_tokens]
                q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        half = self.rotary_dim // 2
        table = self.cos_sin_cache[positions]  # [3, num_tokens, rotary_dim]
        chunks, start = [], 0
        for i, n in enumerate(self.mrope_section):
            chunks.append((i % 3, start, start + n))
            start += n
        cos = torch.cat([table[a, :, s:e] for a, s, e in chunks], dim=-1)  # [num_tokens, rotary_dim / 2]
        sin = torch.cat([table[a, :, half + s : half + e] for a, s, e in chunks], dim=-1)
        per_token = torch.cat((cos, sin), dim=-1).contiguous()  # [num_tokens, rotary_dim]: a table row per token
        rows = torch.arange(positions.shape[1], device=positions.device)
        if self.rotary_dim == self.head_dim:
            return self.ops.rotary_embedding(rows, q, k, per_token)
        q_rot, k_rot = self.ops.rotary_embedding(rows, q[..., : self.rotary_dim].contiguous(),
                                                 k[..., : self.rotary_dim].contiguous(), per_token)
        return (torch.cat((q_rot, q[..., self.rotary_dim:]), dim=-1), torch.cat((k_rot, k[..., self.rotary_dim:]), dim=-1))
