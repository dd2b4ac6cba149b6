"""Helpers for tests and examples: a small trained BPE tokenizer and tiny random checkpoints.

Nothing here touches the network or caches anything globally: every call writes into the folder
it is given. The checkpoints are real Hugging Face checkpoints (``config.json`` + safetensors +
tokenizer files) that ``transformers`` and the engine both load.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

# Roles rendered as "<|role|>\ncontent\n" blocks; the tokenizer adds <s> itself when encoding.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def _training_text() -> list[str]:
    """Text that ships with Python (the help topics), plus some non-ASCII so merges see UTF-8."""
    from pydoc_data import topics

    texts = list(topics.topics.values())[:60]
    texts.append("héllo wörld — naïve café ünïcödé 日本語のテキスト 中文 emoji 🙂🚀 ✓ ±×÷")
    return texts


def train_byte_level_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]):
    """A ``tokenizers.Tokenizer``: byte-level BPE (any string round-trips) trained on ``texts``, the
    ``special_tokens`` first (ids 0, 1, ... in order; they must include ``<s>``), ``<s>`` prepended
    on encode. Deterministic for the same texts and tokenizers version."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def build_tokenizer(path: str | pathlib.Path, vocab_size: int = 512) -> pathlib.Path:
    """Train a byte-level BPE tokenizer (any string round-trips) and save it with transformers.

    Special tokens: ``<pad>`` (0), ``<s>`` (1, bos, prepended on encode), ``</s>`` (2, eos);
    a chat template with roles. Returns ``path``.
    """
    from transformers import PreTrainedTokenizerFast

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_byte_level_bpe(_training_text(), vocab_size, SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(str(path))
    return path


def _config(arch: str, vocab_size: int, overrides: dict[str, Any]):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        cls = LlamaConfig
    elif arch == "llama3":
        cls = LlamaConfig
        common.update(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif arch == "mistral":
        cls = MistralConfig
        common.update(sliding_window=4096)
    elif arch == "qwen2":
        cls = Qwen2Config
        common.update(tie_word_embeddings=True, rope_theta=1000000.0)
    elif arch == "qwen3":
        cls = Qwen3Config
        common.update(head_dim=32, rope_theta=1000000.0)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    common.update(overrides)
    return cls(**common)


def _save_sharded(model, path: pathlib.Path, num_shards: int) -> None:
    """Write the state dict as ``num_shards`` safetensors files plus the HF index."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = sorted(state)
    groups = [names[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    total = 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(path / fname), metadata={"format": "pt"})
        for n in group:
            weight_map[n] = fname
            total += state[n].numel() * state[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(str(path))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(path))


def build_checkpoint(
    path: str | pathlib.Path,
    arch: str = "llama",
    seed: int = 0,
    num_shards: int = 1,
    dtype: str = "float32",
    **config_overrides: Any,
) -> pathlib.Path:
    """Save a tiny random-weight ``transformers`` model of ``arch`` plus the trained tokenizer.

    ``arch`` is one of "llama", "llama3" (llama3 rope scaling), "mistral", "qwen2" (qkv bias,
    tied embeddings) and "qwen3" (q/k norm). Defaults: hidden 64, 2 layers, 4 heads, 2 kv heads,
    vocab = the tokenizer's (512). Returns ``path``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if num_shards < 1:
        raise ValueError("num_shards must be >= 1")
    path = pathlib.Path(path)
    build_tokenizer(path)
    vocab_size = len(AutoTokenizer.from_pretrained(str(path)))
    config = _config(arch, vocab_size, config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # the default init (std 0.02) makes near-uniform logits; spread them
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15 if "embed" in name else 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    model.generation_config.pad_token_id = 0
    if num_shards == 1:
        model.save_pretrained(str(path))
    else:
        _save_sharded(model, path, num_shards)
    return path
