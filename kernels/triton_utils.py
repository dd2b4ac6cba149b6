"""Launch-side helpers shared by the Triton kernels: device checks, block sizes, dot settings.

Importing this module (and every kernel module) needs ``triton`` but no GPU. On the CPU the
kernels run only under Triton's interpreter, which is chosen when a kernel is *decorated*: set
``TRITON_INTERPRET=1`` before ``pageant.kernels.triton_ops`` is first imported.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Triton picks interpreter or GPU compiler when a kernel is decorated, i.e. when the kernel modules
# (which import this one first) are imported: what the environment said then is what counts.
DECORATED_FOR_INTERPRETER = interpreting()


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error instead of a crash deep inside Triton for tensors it cannot reach."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device; got {device} and {t.device}")
    if device.type != "cuda" and not DECORATED_FOR_INTERPRETER:
        raise RuntimeError(
            f"the triton kernels need CUDA tensors (got {device}); on the CPU use the torch "
            "backend, or set TRITON_INTERPRET=1 before pageant.kernels.triton_ops is first imported"
        )


def pow2_at_least(n: int, floor: int) -> int:
    """The smallest power of two that is >= max(n, floor) (tl.arange and tl.dot need powers of two)."""
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def dot_settings(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for ``tl.dot`` on operands of ``dtype``.

    float32 uses "tf32x3" (three TF32 products: ~1e-6 relative, on tensor cores), near the fp32
    reference; plain "tf32" would lose ~1e-3, and "ieee" dots spill registers on sm_90.
    ``upcast`` is true only in the interpreter for bfloat16, whose ``tl.dot`` multiplies the raw
    uint16 storage (a Triton interpreter bug); the operands are then widened to float32 first.
    """
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    return precision, (dtype == torch.bfloat16 and interpreting())


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (a small fixed number in the interpreter)."""
    if not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return num_sms(-1)
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def check_attention_shapes(
    query: torch.Tensor,  # [num_tokens or num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
) -> None:
    """The paged attention kernels' checks of the query against the caches (shapes, GQA, layout)."""
    num_heads, head_dim = query.shape[1:]
    num_kv_heads, cache_head_dim = k_cache.shape[2:]
    if v_cache.shape != k_cache.shape or cache_head_dim != head_dim:
        raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit query {tuple(query.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head_dim must be contiguous")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its last dimension has stride 1 (kernels index rows by stride), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` accumulating in float32 (see ``dot_settings`` for the two flags)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)
