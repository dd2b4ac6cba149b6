"""Rotary position embedding tables (default, linear and Llama 3 scaling), as transformers builds them."""

from __future__ import annotations

import math

import torch

from pageant.engine.config import RopeConfig


def inv_frequencies(rope: RopeConfig, rotary_dim: int) -> torch.Tensor:  # [rotary_dim / 2] float32
    """The inverse frequencies, computed in the same float32 steps as transformers."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    if old_len is None:
        raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin_cache(rope: RopeConfig, rotary_dim: int, max_position: int) -> torch.Tensor:
    """``[max_position, rotary_dim]`` float32: cos of the frequencies in the first half, sin in the
    second (the layout ``pageant.kernels`` expects)."""
    inv_freq = inv_frequencies(rope, rotary_dim)  # [rotary_dim / 2]
    positions = torch.arange(max_position, dtype=torch.float32)  # [max_position]
    freqs = torch.outer(positions, inv_freq)  # [max_position, rotary_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
