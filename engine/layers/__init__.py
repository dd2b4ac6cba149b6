"""The building blocks every model family is made of (one job per file, as in vLLM/nano-vllm).

- ``parallel``: ``ParallelState`` — the tensor-parallel rank/size a layer is built for (passed in
  explicitly, never a module global; world size 1 today).
- ``linear``: ``ColumnParallelLinear``, ``RowParallelLinear``, ``QKVParallelLinear``,
  ``MergedColumnParallelLinear``, ``ReplicatedLinear``; each parameter carries a ``weight_loader``
  that knows how a checkpoint tensor lands in it, and each layer a ``quant_method`` that owns how
  weights are stored and multiplied (dense today).
- ``vocab_embedding``: ``VocabParallelEmbedding``, ``ParallelLMHead`` (tied or not).
- ``layernorm``: ``RMSNorm``, ``GemmaRMSNorm`` (``1 + w``), ``LayerNorm`` (with bias).
- ``rotary``: rotary tables (default, linear, llama3, dynamic NTK, YaRN, longrope) and
  ``RotaryEmbedding`` (full or partial rotary, NeoX or GPT-J pairing).
- ``activation``: ``SiluAndMul``, ``GeluAndMul`` and the plain activations by Hugging Face name.
- ``attention``: ``Attention``, the paged KV write + decode/prefill call (sliding window, logit
  soft-capping, per-layer scale).
- ``moe``: ``FusedMoE`` (top-k router, experts as one fused weight, grouped-GEMM kernel).
"""
