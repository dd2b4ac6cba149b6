"""Random PEFT LoRA adapters for tests, examples and benchmarks (no ``peft`` needed).

``build_lora_adapter`` writes exactly what ``peft``'s ``save_pretrained`` writes for a LoRA on a
Llama-family model (``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight``), so ``peft`` and
the engine both load it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable

from pageant.engine.adapters.spec import PROJECTIONS


def build_lora_adapter(
    base_path: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: Iterable[str] = PROJECTIONS,
    seed: int = 0,
    use_rslora: bool = False,
    std: float = 0.3,
) -> pathlib.Path:
    """Save a random LoRA adapter (non-zero A and B, so it changes outputs) for the checkpoint at
    ``base_path`` into ``out``; returns ``out``."""
    import torch
    from safetensors.torch import save_file

    from pageant.engine.adapters.spec import LoRAModelSpec
    from pageant.engine.config import ModelConfig

    targets = list(target_modules)
    spec = LoRAModelSpec.from_model_config(ModelConfig.from_pretrained(base_path))
    unknown = [t for t in targets if t not in spec.projections]
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; expected some of {list(spec.projections)}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.num_layers):
        for proj in targets:
            in_f, out_f = spec.shape(proj)
            prefix = f"base_model.model.{spec.module_name(layer, proj)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * std
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "target_modules": targets, "bias": "none",
        "use_rslora": use_rslora, "fan_in_fan_out": False, "use_dora": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out
