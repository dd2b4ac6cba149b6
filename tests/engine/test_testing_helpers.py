"""The test helpers build real checkpoints that transformers loads; the tokenizer round-trips."""

import json
import pathlib

import pytest

from pageant.engine.testing import build_tokenizer


def test_tokenizer_round_trips_any_text(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path)))
    assert len(tok) == 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for text in ["héllo wörld", "日本語 🙂🚀", "def f(x):\n    return x  # ok", "\x00\x7f"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_checkpoint_loads_in_transformers(make_checkpoint, arch):
    import torch
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(make_checkpoint(arch, num_shards=2))
    assert (path / "model.safetensors.index.json").exists()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    model = AutoModelForCausalLM.from_pretrained(str(path))
    out = model(torch.tensor([[1, 5, 9]])).logits
    assert out.shape == (1, 3, 512) and torch.isfinite(out).all()
