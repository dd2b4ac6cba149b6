"""One module per model family, all built from ``pageant.engine.layers``.

Every family module defines

- ``config_from_hf(hf: dict) -> ModelConfig``: read its ``config.json`` (refusing what it cannot run);
- a model class with ``__init__(config, ops, max_position, parallel=SINGLE)``,
  ``forward(input_ids [num_tokens], positions [num_tokens], kv_cache, attn_metadata) -> hidden``,
  ``compute_logits(hidden) -> [n, vocab] float32``, ``load_weights(weights) -> set of loaded keys``
  and ``lora_spec(config) -> LoRAModelSpec`` (the projections LoRA may target).

``registry.py`` maps ``config.json`` ``architectures`` to these modules; adding a family is one
file here and one line there.
"""
