"""KV-cache sizing on CUDA from a profiling run: the arithmetic, kept pure so it is unit-tested."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryProfile:
    """What ``torch.cuda`` reported around the worst-case profiling forward, in bytes.

    - ``total`` / ``free``: ``torch.cuda.mem_get_info`` after the run (the whole card; ``free``
      excludes other processes and the CUDA context).
    - ``torch_reserved``: ``torch.cuda.memory_reserved`` then (this process's allocator pool).
    - ``torch_peak``: ``torch.cuda.max_memory_allocated`` during the run: weights + LoRA buffers +
      the largest step's activations and logits.
    - ``profile_kv``: the small KV cache the profiling run itself allocated (counted in the peak,
      but its place is taken by the real pool).
    """

    total: int
    free: int
    torch_reserved: int
    torch_peak: int
    profile_kv: int = 0


def kv_cache_budget_bytes(profile: MemoryProfile, gpu_memory_utilization: float) -> int:
    """Bytes the KV pool may take: ``utilization * total`` minus everything else this engine
    needs at its peak (weights, activations) and minus memory outside torch's allocator (the CUDA
    context, other processes). May be negative: the caller reports that clearly."""
    non_torch = max(0, (profile.total - profile.free) - profile.torch_reserved)
    peak = profile.torch_peak - profile.profile_kv
    return int(profile.total * gpu_memory_utilization) - non_torch - peak


def num_kv_blocks_for_budget(budget_bytes: int, bytes_per_block: int, max_useful_blocks: int | None = None) -> int:
    """Whole blocks that fit the budget (capped at what ``max_num_seqs`` full-length sequences
    could ever use, when given); 0 when nothing fits."""
    if bytes_per_block <= 0:
        raise ValueError("bytes_per_block must be positive")
    num = max(0, budget_bytes) // bytes_per_block
    return int(min(num, max_useful_blocks) if max_useful_blocks is not None else num)
