"""PyTorch references of the batched multi-LoRA kernels (the CPU path and the ground truth).

Every function here has a Triton twin in ``pageant.kernels.lora`` with the same signature.

How a batch is described (as vLLM's Triton punica ops do): the engine gives one adapter *slot*
per token, ``token_lora_indices [num_tokens]`` (``-1`` = base model, no LoRA). Tokens are not
sorted by the engine; ``LoRAKernelMeta.build`` groups them once per batch (a stable argsort plus
per-slot counts), and every shrink/expand launch of every layer reuses that grouping. Each kernel
program then handles a tile of the tokens of ONE adapter slot, so one adapter's weights are read
once per tile and shared by all its tokens (the SGMV idea of Punica/S-LoRA), while decode and
prefill tokens, and sequences of any length, are handled alike (no per-sequence segments needed).

Weights are stacked per projection: ``lora_a_stacked [max_loras, max_rank, in_features]`` and
``lora_b_stacked [max_loras, out_features, max_rank]``; an adapter of lower rank is zero-padded.
The shrink result is float32 (as vLLM's buffer); expand casts it to the weights' dtype first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAKernelMeta:
    """Tokens grouped by adapter slot, computed once per batch and shared by all LoRA launches.

    Invariant: ``sorted_token_indices[slot_start[s + 1] : slot_start[s + 1] + num_tokens_per_slot[s + 1]]``
    are the tokens that use slot ``s`` (index 0 of the count/start arrays is the base model, -1).
    """

    sorted_token_indices: torch.Tensor  # [num_tokens] int32, token ids grouped by slot (stable)
    num_tokens_per_slot: torch.Tensor  # [max_loras + 1] int32, entry 0 counts base-model tokens
    slot_start: torch.Tensor  # [max_loras + 1] int32, exclusive cumsum of the counts
    max_loras: int
    # host copy: (slot, start, count) of every slot with tokens, base model excluded
    segments: tuple[tuple[int, int, int], ...] | None = None

    @staticmethod
    def build(token_lora_indices: torch.Tensor, max_loras: int) -> "LoRAKernelMeta":
        """Group ``token_lora_indices`` ([num_tokens], values in -1 .. max_loras - 1) by slot."""
        if token_lora_indices.dim() != 1:
            raise ValueError("token_lora_indices must be 1-D [num_tokens]")
        idx = token_lora_indices.long()
        if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= max_loras):
            raise ValueError(
                f"token_lora_indices must be in [-1, {max_loras - 1}] for max_loras={max_loras}"
            )
        counts = torch.bincount(idx + 1, minlength=max_loras + 1)  # [max_loras + 1]
        starts = torch.cumsum(counts, 0) - counts
        order = torch.sort(idx, stable=True).indices
        counts_list, starts_list = counts.tolist(), starts.tolist()
        segments = tuple(
            (slot, starts_list[slot + 1], counts_list[slot + 1])
            for slot in range(max_loras) if counts_list[slot + 1]
        )
        return LoRAKernelMeta(
            sorted_token_indices=order.to(torch.int32),
            num_tokens_per_slot=counts.to(torch.int32),
            slot_start=starts.to(torch.int32),
            max_loras=max_loras,
            segments=segments,
        )


def _meta(meta: LoRAKernelMeta | None, token_lora_indices: torch.Tensor, max_loras: int) -> LoRAKernelMeta:
    if meta is None:
        return LoRAKernelMeta.build(token_lora_indices, max_loras)
    if meta.max_loras != max_loras or meta.sorted_token_indices.numel() != token_lora_indices.numel():
        raise ValueError("LoRAKernelMeta was built for another batch or another number of slots")
    return meta


def _check_shrink_shapes(x: torch.Tensor, lora_a_stacked: torch.Tensor) -> None:
    in_features = lora_a_stacked.shape[2]
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(f"x must be [num_tokens, {in_features}], got {list(x.shape)}")


def _check_expand_shapes(y: torch.Tensor, lora_b_stacked: torch.Tensor, out: torch.Tensor, offset: int) -> None:
    _, out_features, rank = lora_b_stacked.shape
    if y.dim() != 2 or y.shape[1] != rank:
        raise ValueError(f"y must be [num_tokens, {rank}], got {list(y.shape)}")
    if out.shape[0] != y.shape[0] or out.shape[1] < offset + out_features:
        raise ValueError(
            f"out {list(out.shape)} cannot hold {out_features} columns at offset {offset} "
            f"for {y.shape[0]} tokens"
        )


def _segments(meta: LoRAKernelMeta, num_tokens: int):
    """(slot, token rows [n] int64 or None = every token) for every slot with tokens, base excluded."""
    segments = meta.segments
    if segments is None:
        counts, starts = meta.num_tokens_per_slot.tolist(), meta.slot_start.tolist()
        segments = [(s, starts[s + 1], counts[s + 1]) for s in range(meta.max_loras) if counts[s + 1]]
    order = meta.sorted_token_indices
    for slot, start, count in segments:
        yield slot, (None if count == num_tokens else order[start : start + count].long())


def lora_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a_stacked: torch.Tensor,  # [max_loras, rank, in_features]
    token_lora_indices: torch.Tensor,  # [num_tokens] int, -1 = no LoRA
    scale: float = 1.0,
    *,
    meta: LoRAKernelMeta | None = None,
) -> torch.Tensor:  # [num_tokens, rank] float32; rows of base-model tokens are zero
    """``out[t] = scale * x[t] @ lora_a_stacked[slot[t]].T`` for tokens with an adapter."""
    max_loras, rank, _ = lora_a_stacked.shape
    _check_shrink_shapes(x, lora_a_stacked)
    meta = _meta(meta, token_lora_indices, max_loras)
    out = torch.zeros(x.shape[0], rank, dtype=torch.float32, device=x.device)
    for slot, rows in _segments(meta, x.shape[0]):
        xs = (x if rows is None else x.index_select(0, rows)).float()  # [n, in]
        y = xs @ lora_a_stacked[slot].float().T  # [n, rank]
        if scale != 1.0:
            y = y * scale
        if rows is None:
            out = y
        else:
            out.index_copy_(0, rows, y)
    return out


def lora_expand(
    y: torch.Tensor,  # [num_tokens, rank] (float32 from lora_shrink)
    lora_b_stacked: torch.Tensor,  # [max_loras, out_features, rank]
    token_lora_indices: torch.Tensor,  # [num_tokens] int, -1 = no LoRA
    out: torch.Tensor,  # [num_tokens, >= offset + out_features], written in place
    add_inputs: bool = True,
    *,
    offset: int = 0,
    meta: LoRAKernelMeta | None = None,
) -> torch.Tensor:  # out
    """``out[t, offset:offset+out_features] (+)= y[t] @ lora_b_stacked[slot[t]].T``.

    Rows of base-model tokens are left untouched; ``add_inputs=False`` overwrites the rows of
    tokens with an adapter instead of accumulating.
    """
    max_loras, out_features, _ = lora_b_stacked.shape
    _check_expand_shapes(y, lora_b_stacked, out, offset)
    meta = _meta(meta, token_lora_indices, max_loras)
    cols = out[:, offset : offset + out_features]
    for slot, rows in _segments(meta, y.shape[0]):
        ys = (y if rows is None else y.index_select(0, rows)).to(lora_b_stacked.dtype).float()  # [n, rank]
        delta = ys @ lora_b_stacked[slot].float().T  # [n, out_features]
        if rows is None:
            if add_inputs:
                delta = delta + cols.float()
            cols.copy_(delta)
        elif add_inputs and out.dtype == torch.float32:
            cols.index_add_(0, rows, delta)  # the same sum, in one op
        else:
            if add_inputs:
                delta = delta + cols.index_select(0, rows).float()
            cols.index_copy_(0, rows, delta.to(out.dtype))
    return out


def sliced_ops(shrink: Callable[..., torch.Tensor], expand: Callable[..., torch.Tensor]):
    """``(lora_shrink_sliced, lora_expand_sliced)`` built on one module's ``lora_shrink`` and
    ``lora_expand`` (this one's, or the Triton twins): every slice of a fused projection (e.g. q,
    k, v of a fused qkv) shares one ``LoRAKernelMeta``."""

    def lora_shrink_sliced(
        x: torch.Tensor,  # [num_tokens, in_features]
        lora_a_stacked: list[torch.Tensor] | tuple[torch.Tensor, ...],  # each [max_loras, rank, in_features]
        token_lora_indices: torch.Tensor,  # [num_tokens]
        scale: float = 1.0,
        *,
        meta: LoRAKernelMeta | None = None,
    ) -> torch.Tensor:  # [num_slices, num_tokens, rank] float32
        """One shrink per slice of a fused projection (e.g. q, k, v of a fused qkv)."""
        if meta is None and lora_a_stacked:
            meta = LoRAKernelMeta.build(token_lora_indices, lora_a_stacked[0].shape[0])
        return torch.stack(
            [shrink(x, a, token_lora_indices, scale, meta=meta) for a in lora_a_stacked]
        )

    def lora_expand_sliced(
        y: torch.Tensor,  # [num_slices, num_tokens, rank]
        lora_b_stacked: list[torch.Tensor] | tuple[torch.Tensor, ...],  # slice i: [max_loras, out_i, rank]
        token_lora_indices: torch.Tensor,  # [num_tokens]
        out: torch.Tensor,  # [num_tokens, sum(out_i)]: slice i lands at columns offset_i = sum(out_<i)
        add_inputs: bool = True,
        *,
        meta: LoRAKernelMeta | None = None,
    ) -> torch.Tensor:  # out
        """One expand per slice, each into its column range of the fused output."""
        if meta is None and lora_b_stacked:
            meta = LoRAKernelMeta.build(token_lora_indices, lora_b_stacked[0].shape[0])
        offset = 0
        for i, b in enumerate(lora_b_stacked):
            expand(y[i], b, token_lora_indices, out, add_inputs, offset=offset, meta=meta)
            offset += b.shape[1]
        return out

    return lora_shrink_sliced, lora_expand_sliced


lora_shrink_sliced, lora_expand_sliced = sliced_ops(lora_shrink, lora_expand)
