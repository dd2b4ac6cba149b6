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
# A tool-capable template in the Hermes / Qwen2.5 style (tools listed in <tools>, calls written as
# <tool_call>{"name", "arguments"}</tool_call>, results as <tool_response>), for tool-calling tests.
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}"
    "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\nFor each function call, return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}<|im_start|>assistant\n{{ message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] %}\n<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", "
    "\"arguments\": {{ call['function']['arguments'] | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{%- elif not (tools and loop.first and message['role'] == 'system') %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gpt_neox", "falcon", "falcon7b", "mixtral", "gemma2", "phi3")


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
    import transformers

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
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}
    # Phi-3's longrope: short factors within original_max_position_embeddings (128, above every test
    # sequence), and factor 512 / 128 = 4 puts an attention factor != 1 on cos and sin
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 128}
    norm_eps = {"rms_norm_eps": None}  # families with LayerNorm spell eps their own way
    families: dict[str, tuple[str, dict[str, Any]]] = {
        "llama": ("LlamaConfig", {}),
        "llama3": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": llama3_rope}),
        "mistral": ("MistralConfig", {"sliding_window": 4096}),
        "qwen2": ("Qwen2Config", {"tie_word_embeddings": True, "rope_theta": 1000000.0}),
        "qwen3": ("Qwen3Config", {"head_dim": 32, "rope_theta": 1000000.0}),
        # partial rotary (a quarter of each head), parallel residual, LayerNorm with bias, per-head fused qkv
        "gpt_neox": ("GPTNeoXConfig", {**norm_eps, "num_key_value_heads": None, "rotary_pct": 0.25,
                                       "layer_norm_eps": 1e-5, "use_parallel_residual": True}),
        # Falcon-40B/180B layout: grouped fused qkv (GQA), two LayerNorms in parallel attention
        "falcon": ("FalconConfig", {**norm_eps, "num_key_value_heads": None, "intermediate_size": None,
                                    "new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 128,
                                    "tie_word_embeddings": True}),
        # Falcon-7B layout: multi-query fused qkv, one LayerNorm for the parallel attention + MLP
        "falcon7b": ("FalconConfig", {**norm_eps, "num_key_value_heads": None, "intermediate_size": None,
                                      "new_decoder_architecture": False, "multi_query": True,
                                      "parallel_attn": True, "ffn_hidden_size": 128, "tie_word_embeddings": True}),
        "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
        # alternating sliding (32 tokens) / global layers, soft-capping, (1 + w) norms, GeGLU, tied
        "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 32, "query_pre_attn_scalar": 16,
                                    "tie_word_embeddings": True}),
        "phi3": ("Phi3Config", {"rope_parameters": longrope, "original_max_position_embeddings": 128}),
    }
    if arch not in families:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    cls_name, extra = families[arch]
    common.update(extra)
    common.update(overrides)
    return getattr(transformers, cls_name)(**{k: v for k, v in common.items() if v is not None})


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

    ``arch`` is one of ``ARCHS``: "llama", "llama3" (llama3 rope scaling), "mistral", "qwen2" (qkv
    bias, tied embeddings), "qwen3" (q/k norm), "gpt_neox", "falcon" (new decoder architecture),
    "falcon7b" (multi-query), "mixtral" (4 experts, top 2), "gemma2", "phi3" (longrope). Defaults:
    hidden 64, 2 layers, 4 heads, 2 kv heads, vocab = the tokenizer's (512). Returns ``path``.
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
