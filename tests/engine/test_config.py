"""Model/engine configuration: both rope layouts, sliding windows per layer, clear errors."""

from __future__ import annotations


import pytest

from pageant.engine import LLMEngine
from pageant.engine.config import EngineConfig, ModelConfig, resolve_max_model_len
from pageant.engine.loader import resolve_model_path

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}


def test_rope_from_old_and_new_layouts():
    old = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})
    assert old.rope == new.rope and old.rope.rope_type == "llama3" and old.rope.theta == 500000.0
    assert ModelConfig.from_dict(BASE).rope.rope_type == "default"
    assert old.num_kv_heads == 2 and old.head_dim == 4
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "mystery", "factor": 2.0}})
    with pytest.raises(ValueError, match="short_factor and long_factor"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="unsupported model architecture"):
        ModelConfig.from_dict({**BASE, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_qwen2_bias_and_qwen3_norm_flags():
    q2 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 8})
    assert q2.qkv_bias and not q2.o_bias and q2.sliding_window is None  # use_sliding_window is off
    q3 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 16})
    assert q3.qk_norm and q3.head_dim == 16 and not q3.qkv_bias


def test_sliding_window_no_longer_caps_max_model_len(make_checkpoint):
    """Sliding-window layers attend their window (tests/engine/test_model_families.py checks the
    outputs past the window against transformers), so the context stays the model's."""
    path = make_checkpoint("mistral", sliding_window=128)
    engine = LLMEngine.from_kwargs(model=path, num_kv_blocks=16)
    assert engine.config.max_model_len == 512
    model = ModelConfig.from_pretrained(path)
    assert model.sliding_window == 128 and model.layer_sliding_windows == (128, 128)
    with pytest.raises(ValueError, match="exceeds"):
        resolve_max_model_len(1024, model)
    assert resolve_max_model_len(100, model) == 100


def test_engine_config_validation(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model="x", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        EngineConfig(model="x", device="tpu")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(model="x", block_size=0)
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        resolve_model_path(str(tmp_path / "missing" / "deeper"))
