"""LoRA adapters: PEFT loading and validation, the LoRA manager, LoRA-aware projections.

- ``load_peft_adapter`` / ``LoRAAdapterError``: read and validate a PEFT adapter folder.
- ``LoRAManager``: adapters by name, CPU LRU cache, ``max_loras`` device slots, per-batch delta.
- ``wrap_model``: give a loaded model's projections their LoRA delta.

The shrink/expand kernels live in ``pageant.kernels.lora`` (Triton) and
``pageant.kernels.lora_reference`` (PyTorch).
"""

from pageant.engine.adapters.layers import LoRALinear, wrap_model
from pageant.engine.adapters.manager import LoRABatch, LoRAManager, lora_ops
from pageant.engine.adapters.peft_loader import (
    LoRAAdapter,
    LoRAAdapterError,
    LoRANotFoundError,
    load_peft_adapter,
    resolve_adapter_dir,
)
from pageant.engine.adapters.spec import PROJECTIONS, LoRAModelSpec

__all__ = [
    "LoRAAdapter",
    "LoRAAdapterError",
    "LoRANotFoundError",
    "LoRABatch",
    "LoRALinear",
    "LoRAManager",
    "LoRAModelSpec",
    "PROJECTIONS",
    "load_peft_adapter",
    "lora_ops",
    "resolve_adapter_dir",
    "wrap_model",
]
