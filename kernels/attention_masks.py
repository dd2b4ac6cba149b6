"""Sliding-window and soft-cap options of the paged attention kernels (pure PyTorch, no Triton).

Both ``pageant.kernels.reference`` and the Triton launchers validate their keyword options here, so
the two backends accept and reject exactly the same values. The semantics are Hugging Face
transformers' eager attention (Gemma 2, Mistral, Phi-3):

- ``sliding_window`` ``W``: a query at position ``p`` sees key positions ``k`` with
  ``p - W < k <= p`` (``W`` tokens, its own included; transformers' ``kv_idx > q_idx - sliding_window``
  on top of the causal mask). ``None``: every position up to ``p``.
- ``logits_soft_cap`` ``c``: scores ``s = (q . k) * scale`` become ``c * tanh(s / c)`` before the
  mask and the softmax (Gemma 2's ``attn_logit_softcapping``). ``None``: no cap.
"""

from __future__ import annotations

import math

import torch


def check_attention_options(
    sliding_window: int | None, logits_soft_cap: float | None
) -> tuple[int | None, float | None]:
    """``(sliding_window, logits_soft_cap)`` as ``(int | None, float | None)``; ValueError if invalid."""
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0:
            raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
        sliding_window = int(sliding_window)
    if logits_soft_cap is not None:
        if (
            isinstance(logits_soft_cap, bool)
            or not isinstance(logits_soft_cap, (int, float))
            or not math.isfinite(logits_soft_cap)
            or logits_soft_cap <= 0
        ):
            raise ValueError(f"logits_soft_cap must be None or a positive float, got {logits_soft_cap!r}")
        logits_soft_cap = float(logits_soft_cap)
    return sliding_window, logits_soft_cap


def visible_keys(
    q_pos: torch.Tensor,  # [..., m] query positions
    k_pos: torch.Tensor,  # [..., t] key positions
    sliding_window: int | None,
) -> torch.Tensor:  # [..., m, t] bool: key k is visible to query q
    """Causal visibility, narrowed to the last ``sliding_window`` positions when one is given."""
    allowed = k_pos[..., None, :] <= q_pos[..., :, None]
    if sliding_window is not None:
        allowed = allowed & (k_pos[..., None, :] > q_pos[..., :, None] - sliding_window)
    return allowed
