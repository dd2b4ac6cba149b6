"""Fixtures for the server tests: the module's main server (an API key) and LoRA adapters.

``serve``, ``server_process`` and ``tiny_checkpoint`` come from the root tests/conftest.py.
"""

from __future__ import annotations

import pathlib

import pytest

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def api_server(serve):
    """The module's main server (a ``ServerProcess``): the tiny model, an API key, a small context."""
    return serve("--api-key", API_KEY, "--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "16",
                 "--served-model-name", "tiny", "--disable-log-requests", "--uvicorn-log-level", "warning")


@pytest.fixture(scope="session")
def make_server_adapter(tmp_path_factory, tiny_checkpoint):
    """``make_server_adapter(seed) -> dir``: a PEFT LoRA adapter (random non-zero A and B) for the tiny model."""

    def make(seed: int, root: pathlib.Path | None = None) -> str:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:  # peft zero-inits B: make the adapter matter
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        out = (root or tmp_path_factory.mktemp("adapters")) / f"adapter-{seed}"
        model.save_pretrained(str(out))
        return str(out)

    return make
