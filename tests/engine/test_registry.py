"""The architecture registry: every supported family builds, loads and is documented; what is
not supported fails at startup with the list; checkpoints in either Mixtral expert layout load."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import pytest

from pageant.engine import LLM, SamplingParams
from pageant.engine.config import ModelConfig
from pageant.engine.models.registry import MODELS, SUPPORTED_ARCHITECTURES, architecture_of, model_class

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
ALL = ["llama", "mistral", "qwen2", "qwen3", "gpt_neox", "falcon", "mixtral", "gemma2", "phi3"]
SP = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_readme_table_lists_exactly_the_registry():
    rows = re.findall(r"^\| `(\w+For(?:CausalLM|ConditionalGeneration))` \|", README.read_text(), flags=re.M)
    assert sorted(rows) == sorted(SUPPORTED_ARCHITECTURES)


def test_unsupported_architecture_names_every_supported_one():
    with pytest.raises(ValueError, match="unsupported model architecture") as err:
        ModelConfig.from_dict({"architectures": ["BloomForCausalLM"], "model_type": "bloom"})
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="alibi"):
        ModelConfig.from_dict({"architectures": ["FalconForCausalLM"], "alibi": True, "vocab_size": 8,
                               "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1})


def test_model_type_fallback_and_old_falcon_names():
    assert architecture_of({"model_type": "gemma2"}) == "Gemma2ForCausalLM"
    cfg = ModelConfig.from_dict({"model_type": "falcon", "vocab_size": 8, "hidden_size": 16, "n_head": 4,
                                 "n_layer": 3, "new_decoder_architecture": True, "n_head_kv": 2})
    assert (cfg.num_heads, cfg.num_layers, cfg.num_kv_heads, cfg.option("qkv_layout")) == (4, 3, 2, "grouped")
    assert all(model_class(a).__name__ == cls for a, (_, cls, _) in MODELS.items())


@pytest.mark.parametrize("arch", ALL)
def test_every_family_checkpoint_loads_and_dummy_weights_run(make_checkpoint, arch):
    """The loader fills every parameter of each family from its checkpoint; load_format="dummy"
    builds the same model with random weights and generates."""
    path = make_checkpoint(arch)
    real = LLM(model=path).generate({"prompt_token_ids": [1, 5, 6, 7]}, SP, use_tqdm=False)[0]
    dummy = LLM(model=path, load_format="dummy").generate({"prompt_token_ids": [1, 5, 6, 7]}, SP, use_tqdm=False)[0]
    assert len(real.outputs[0].token_ids) == len(dummy.outputs[0].token_ids) == 4


def test_missing_weight_is_named(make_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = pathlib.Path(make_checkpoint("gemma2"))
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    del state["model.layers.1.pre_feedforward_layernorm.weight"]
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match="pre_feedforward_layernorm"):
        LLM(model=str(dst))


def test_mixtral_fused_expert_layout_loads(make_checkpoint, hf_greedy, tmp_path):
    """transformers 5 holds Mixtral's experts fused (``mlp.experts.gate_up_proj [E, 2I, H]``); a
    checkpoint written from that in-memory state dict loads to the same model as the per-expert one."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    src = pathlib.Path(make_checkpoint("mixtral"))
    dst = tmp_path / "fused"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {k: v.contiguous() for k, v in AutoModelForCausalLM.from_pretrained(str(src)).state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    prompt = [1] + list(range(30, 60))
    fused = LLM(model=str(dst)).generate({"prompt_token_ids": prompt}, SP, use_tqdm=False)[0]
    assert fused.outputs[0].token_ids == hf_greedy(str(src), [prompt], 4)[0]
    assert json.loads((dst / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
