"""A request's multimodal inputs: the prompt with placeholders expanded, and its images.

Each image is a ``MultiModalItem``: the processor's tensors for it (``data``, e.g. ``pixel_values``
and for Qwen2-VL ``image_grid_thw``), the SHA-256 of its decoded pixels (``hash``: the encoder
cache key and part of the prefix-cache hash of every KV block its placeholders touch) and where its
placeholder tokens sit in the prompt (``offset``, ``length``).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def image_hash(image) -> bytes:
    """SHA-256 of a PIL image's mode, size and pixels (the same picture in PNG or WebP hashes alike)."""
    h = hashlib.sha256(b"pageant-image-v1")
    h.update(image.mode.encode() + struct.pack("<II", *image.size))
    h.update(image.tobytes())
    return h.digest()


@dataclass(eq=False)
class MultiModalItem:
    """One image of a prompt: processor tensors, content hash, placeholder range ``[offset, offset + length)``."""

    hash: bytes
    offset: int
    length: int
    data: dict[str, torch.Tensor] = field(repr=False)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(eq=False)
class MultiModalInputs:
    """What the processor made of a prompt and its images.

    ``mrope_positions`` (M-RoPE models, Qwen2-VL): ``[3, num_prompt_tokens]`` int64 (t, h, w) and
    ``mrope_delta``: a generated token at position ``p`` uses ``p + mrope_delta`` on all three axes.
    """

    prompt_token_ids: list[int]
    items: list[MultiModalItem]
    mrope_positions: np.ndarray | None = None  # [3, num_prompt_tokens] int64
    mrope_delta: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def block_key(self, start: int, end: int) -> bytes:
        """The hashes of the images whose placeholders overlap prompt positions ``[start, end)``,
        with the overlap (folded into that KV block's prefix-cache hash); b"" when none do."""
        parts = [it.hash + struct.pack("<qq", max(start, it.offset) - it.offset, min(end, it.end) - it.offset)
                 for it in self.items if it.offset < end and start < it.end]
        return b"".join(parts)

    def overlapping(self, start: int, end: int) -> list[tuple[int, MultiModalItem]]:
        """``(index, item)`` of the images whose placeholders overlap ``[start, end)``."""
        return [(i, it) for i, it in enumerate(self.items) if it.offset < end and start < it.end]
