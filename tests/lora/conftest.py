"""LoRA tests: Triton kernels run in the CPU interpreter, so set it before triton is imported."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib

import pytest


def _build_adapter(base_path: str, out: pathlib.Path, *, r: int, alpha: float, targets, seed: int,
                   use_rslora: bool = False, **extra) -> str:
    """Save a PEFT LoRA adapter for the checkpoint at ``base_path`` with random non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        use_rslora=use_rslora, task_type="CAUSAL_LM", **extra)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # peft zero-inits B: make the adapter matter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """``make_adapter(base_path, r=4, alpha=8, targets=(...), seed=0, **lora_config) -> adapter dir``."""
    built: dict[tuple, str] = {}

    def make(base_path: str, r: int = 4, alpha: float = 8, targets=("q_proj", "v_proj"), seed: int = 0,
             root: pathlib.Path | None = None, **extra) -> str:
        key = (base_path, r, alpha, tuple(targets), seed, str(root), repr(sorted(extra.items())))
        if key not in built:
            parent = root if root is not None else tmp_path_factory.mktemp("adapters")
            out = parent / f"lora-r{r}-s{seed}-{len(built)}"
            built[key] = _build_adapter(base_path, out, r=r, alpha=alpha, targets=targets, seed=seed, **extra)
        return built[key]

    return make


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> pathlib.Path:
    """An allowed adapter root folder (tests put adapters inside and outside of it)."""
    return tmp_path_factory.mktemp("lora-root")
