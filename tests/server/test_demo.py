"""The bundled demo model: small, reproducible, and `pageant serve` with no --model answers in English."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import httpx
import openai

from pageant.engine.demo import CHECKPOINT_DIR, DEMO_MODEL_NAME

COMMON_WORDS = {"the", "a", "an", "is", "are", "of", "to", "and", "in", "be", "that", "for", "if", "it", "as", "by",
                "or", "with", "this", "not", "can", "which", "statement", "value", "object", "function", "return"}


def test_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in CHECKPOINT_DIR.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.json"):
        assert name in files, name
    assert sum(files.values()) <= 20 * 1024 * 1024
    config = json.loads((CHECKPOINT_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    training = json.loads((CHECKPOINT_DIR / "TRAINING.json").read_text())
    assert 1e6 <= training["num_params"] <= 5e6


def test_training_script_reproduces_the_tokenizer(tmp_path):
    """The tokenizer half of engine/demo/train.py is deterministic: it rebuilds the shipped one exactly."""
    from pageant.engine.demo.train import corpus, train_tokenizer

    train_tokenizer([text for _, text in corpus()], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((CHECKPOINT_DIR / name).read_text()), name
    assert (tmp_path / "chat_template.jinja").read_text() == (CHECKPOINT_DIR / "chat_template.jinja").read_text()


def test_serve_without_model_answers_a_chat_in_english(serve):
    server = serve("--uvicorn-log-level", "warning", model=None)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL_NAME]
    resp = client.chat.completions.create(model=DEMO_MODEL_NAME, max_tokens=48, temperature=0,
                                          messages=[{"role": "user", "content": "Tell me about the assert statement."}])
    text = resp.choices[0].message.content
    words = re.findall(r"[A-Za-z]+", text.lower())
    assert len(words) >= 8, text
    assert len(set(words) & COMMON_WORDS) >= 3, text  # English-like, not noise
    printable = sum(ch.isascii() and (ch.isprintable() or ch.isspace()) for ch in text)
    assert printable / len(text) > 0.95, text
    assert httpx.get(f"{server.base_url}/health").status_code == 200

    # The shipped example works against it as documented.
    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "openai_client.py"
    out = subprocess.run([sys.executable, str(example), "--base-url", f"{server.base_url}/v1"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "using pageant-demo" in out.stdout and "finish_reason=" in out.stdout and "usage=" in out.stdout

