"""The LoRA request type; adapters themselves live in ``pageant.engine.adapters``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """Names a LoRA adapter to apply to a request: a unique name (what clients ask for), a unique
    positive id, and the PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    lora_name: str
    lora_int_id: int
    lora_path: str
