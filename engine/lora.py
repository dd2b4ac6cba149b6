"""LoRA adapters (a later issue): only the request type exists for now."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """Names a LoRA adapter to apply to a request. Not supported by the engine yet."""

    lora_name: str
    lora_int_id: int
    lora_path: str
