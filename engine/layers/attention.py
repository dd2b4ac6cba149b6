"""The paged attention call every model family makes: write this step's K/V, then attend.

A step's sequences come decodes first (see ``AttentionMetadata``): all-decode steps run the decode
kernel, all-prefill steps the prefill/extend kernel, mixed steps both on their halves.

FP8 KV cache (``kv_cache_dtype="fp8"``, vLLM's name): the pool is ``float8_e4m3fn``; each layer's
``k_scale`` / ``v_scale`` (float32 scalars, 1.0 unless the checkpoint has them, see
``kv_scale_target``) divide K/V on the write and multiply them back on the read, inside the kernels.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from pageant.engine.attention import AttentionMetadata

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's --kv-cache-dtype values that are supported
FP8_KV_CACHE_DTYPE = torch.float8_e4m3fn


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element type: the model dtype for "auto", float8 e4m3 for "fp8" / "fp8_e4m3"."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return FP8_KV_CACHE_DTYPE
    raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")


# checkpoint suffixes of per-layer KV-cache scales (vLLM's maybe_remap_kv_scale_name and
# compressed-tensors' get_cache_scale): suffix -> the scales it sets (none: read and ignored)
_KV_SCALE_SUFFIXES = (
    (".k_proj.output_scale", ("k_scale",)),  # older compressed-tensors (output activations of k/v_proj)
    (".v_proj.output_scale", ("v_scale",)),
    (".k_proj.k_scale", ("k_scale",)),  # ModelOpt
    (".v_proj.v_scale", ("v_scale",)),
    (".k_scale", ("k_scale",)),  # compressed-tensors kv_cache_scheme: <attention module>.k_scale
    (".v_scale", ("v_scale",)),
    (".kv_scale", ("k_scale", "v_scale")),  # deprecated single scale for both
    (".q_proj.output_scale", ()),  # query / probability scales: for FP8 attention math, not used here
    (".q_scale", ()),
    (".prob_output_scale", ()),
)


def kv_scale_target(name: str) -> tuple[str, tuple[str, ...]] | None:
    """``(module path, scales)`` for a checkpoint tensor that is a KV-cache scale, else None.

    ``model.layers.3.self_attn.k_scale`` -> ``("model.layers.3.self_attn", ("k_scale",))``; the
    path is the checkpoint's attention module (whose ``attn`` child, or itself, is ``Attention``).
    """
    for suffix, scales in _KV_SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], scales
    return None


def find_attention(modules: dict[str, nn.Module], path: str) -> "Attention | None":
    """The ``Attention`` layer at ``path`` or at ``path.attn`` among ``modules`` (named_modules)."""
    for candidate in (path, f"{path}.attn"):
        module = modules.get(candidate)
        if isinstance(module, Attention):
            return module
    return None


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache, GQA-aware.

    ``scale`` multiplies q·k (``head_dim ** -0.5`` for most models, Gemma 2's
    ``query_pre_attn_scalar ** -0.5``); ``sliding_window`` limits each query to the last that many
    positions, itself included; ``logits_soft_cap`` maps scores to ``cap * tanh(score / cap)``.

    ``k_scale`` / ``v_scale``: float32 scalar buffers (1.0 by default, from the checkpoint when it
    has them), used only when the KV cache is FP8: the cache holds ``k / k_scale`` in e4m3.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, ops: ModuleType, *,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale, self.ops = scale, ops
        self.sliding_window, self.logits_soft_cap = sliding_window, logits_soft_cap
        self.options: dict = {}
        if sliding_window is not None:
            self.options["sliding_window"] = sliding_window
        if logits_soft_cap is not None:
            self.options["logits_soft_cap"] = logits_soft_cap
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self._checkpoint_scales: dict[str, float] = {}  # what load_kv_scale read, kept across init_buffers

    def init_buffers(self, device: torch.device) -> None:
        """(Re)make the scales in float32 on ``device`` (the loader casts float buffers to the model
        dtype after a meta build); values loaded from the checkpoint are kept."""
        for name in ("k_scale", "v_scale"):
            value = self._checkpoint_scales.get(name, 1.0)
            setattr(self, name, torch.full((), value, dtype=torch.float32, device=device))

    def load_kv_scale(self, name: str, tensor: torch.Tensor) -> None:
        """Set ``name`` ("k_scale" or "v_scale") from a checkpoint tensor holding one positive value
        (per-tensor scales only, as vLLM supports)."""
        if name not in ("k_scale", "v_scale"):
            raise ValueError(f"unknown KV-cache scale {name!r}; expected 'k_scale' or 'v_scale'")
        if tensor.numel() != 1:
            raise ValueError(f"{name} must hold one per-tensor value, got shape {tuple(tensor.shape)} "
                             "(per-head or per-channel KV-cache scales are not supported)")
        value = float(tensor.float().reshape(()))
        if not value > 0 or value == float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
        self._checkpoint_scales[name] = value
        getattr(self, name).fill_(value)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads * head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads * head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        md: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        ops, opts = self.ops, self.options
        num_tokens = q.shape[0]
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        # an FP8 cache holds k / k_scale and v / v_scale; other caches take no scales
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale} if kv_cache.dtype == FP8_KV_CACHE_DTYPE else {}
        ops.reshape_and_cache(k, v, k_cache, v_cache, md.slot_mapping, **scales)
        opts = {**opts, **scales}
        nd = md.num_decode_seqs
        if nd == md.num_seqs:
            out = ops.paged_attention_decode(q, k_cache, v_cache, md.block_tables, md.seq_lens, self.scale, **opts)
        elif nd == 0:
            out = ops.paged_attention_prefill(q, k_cache, v_cache, md.block_tables, md.query_start_loc,
                                              md.seq_lens, self.scale, **opts)
        else:
            out = torch.empty_like(q)
            out[:nd] = ops.paged_attention_decode(q[:nd], k_cache, v_cache, md.block_tables[:nd], md.seq_lens[:nd],
                                                  self.scale, **opts)
            out[nd:] = ops.paged_attention_prefill(
                q[nd:], k_cache, v_cache, md.block_tables[nd:], md.query_start_loc[nd:] - nd,
                md.seq_lens[nd:], self.scale, **opts,
            )
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
