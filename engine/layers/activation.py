"""Activations: the gated ones over a fused ``[gate | up]`` input, and plain ones by Hugging Face name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``gelu_new`` (GPT-2's tanh approximation, written out as it does)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_new,
    "relu": F.relu,
}


def get_act_fn(name: str):
    """The activation called ``name`` in a Hugging Face config (``hidden_act``/``hidden_activation``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class ActAndMul(nn.Module):
    """``act(gate) * up`` for ``x = [gate | up]``: ``[n, 2 * d] -> [n, d]`` (SwiGLU, GeGLU)."""

    def __init__(self, act_name: str):
        super().__init__()
        self.act_name = act_name
        self.act = get_act_fn(act_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up


def SiluAndMul() -> ActAndMul:  # noqa: N802 (vLLM's name)
    return ActAndMul("silu")


def GeluAndMul(approximate: str = "none") -> ActAndMul:  # noqa: N802
    return ActAndMul("gelu_pytorch_tanh" if approximate == "tanh" else "gelu")
