"""``config.json`` ``architectures`` -> the family module and model class that serve it."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

# architecture: (module in pageant.engine.models, class, model_type for configs without architectures)
MODELS: dict[str, tuple[str, str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM", "llama"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM", "mistral"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM", "qwen2"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM", "qwen3"),
    "GPTNeoXForCausalLM": ("gpt_neox", "GPTNeoXForCausalLM", "gpt_neox"),
    "FalconForCausalLM": ("falcon", "FalconForCausalLM", "falcon"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM", "mixtral"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM", "gemma2"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM", "phi3"),
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration", "llava"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration", "qwen2_vl"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(MODELS))


def architecture_of(hf: dict[str, Any]) -> str:
    """The supported architecture a config names (its ``architectures``, else its ``model_type``)."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in MODELS:
            return arch
    if not archs:
        for arch, (_, _, model_type) in MODELS.items():
            if hf.get("model_type") == model_type:
                return arch
    raise ValueError(
        f"unsupported model architecture {archs or hf.get('model_type')!r}; supported: {list(SUPPORTED_ARCHITECTURES)}"
    )


def resolve_architecture(hf: dict[str, Any]) -> ModuleType:
    """The family module for a raw ``config.json`` dict."""
    return importlib.import_module(f"pageant.engine.models.{MODELS[architecture_of(hf)][0]}")


def model_class(architecture: str) -> type:
    """The model class for a supported architecture name."""
    if architecture not in MODELS:
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: {list(SUPPORTED_ARCHITECTURES)}")
    module, cls, _ = MODELS[architecture]
    return getattr(importlib.import_module(f"pageant.engine.models.{module}"), cls)
