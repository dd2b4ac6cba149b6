"""GPU kernels for the engine, each with a plain PyTorch reference of the same signature.

- ``pageant.kernels.reference``: PyTorch implementations (the CPU path and the ground truth).
- ``pageant.kernels.triton_ops``: Triton implementations (the GPU path; tested on the CPU with
  ``TRITON_INTERPRET=1``).

This package imports neither the engine nor the operator.

KV-cache layout shared by every kernel (one pool for all layers, allocated by the engine)::

    kv_cache:  [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    k_cache = kv_cache[layer, 0]  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache = kv_cache[layer, 1]

A token's *slot* is ``block_id * block_size + offset_in_block``. ``block_tables`` is an int32
``[num_seqs, max_num_blocks_per_seq]`` tensor whose padding entries are never read past
``seq_lens``. Query tokens of a sequence are its *last* ``q_len`` positions: query ``j`` of
sequence ``i`` sits at position ``seq_lens[i] - q_len_i + j`` and attends causally to every
cached position up to and including its own (its own K/V is written before attention runs).
"""

from types import ModuleType

ATTENTION_BACKENDS = ("torch", "triton")


def get_ops(backend: str) -> ModuleType:
    """The module of kernels for ``backend`` ("torch" or "triton"); both expose the same functions:
    ``reshape_and_cache``, ``paged_attention_decode``, ``paged_attention_prefill``, ``rms_norm``,
    ``fused_add_rms_norm``, ``rotary_embedding``, ``fused_moe`` and ``select_experts``.

    "torch" is ``pageant.kernels.cpu_ops``: the reference's functions with paged attention that
    reads the KV pool in place on the CPU (the reference itself stays the tests' ground truth).
    """
    if backend == "torch":
        from pageant.kernels import cpu_ops

        return cpu_ops
    if backend == "triton":
        from pageant.kernels import triton_ops

        return triton_ops
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
