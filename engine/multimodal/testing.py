"""Tiny random vision-language checkpoints for tests and benchmarks (no Hub access).

``build_llava_checkpoint`` writes a LLaVA-1.5 style model (CLIP vision tower + MLP projector +
Llama), ``build_qwen2_vl_checkpoint`` a Qwen2-VL one (its vision transformer with 2x2 patch merge
+ Qwen2 with M-RoPE), ``build_qwen2_5_vl_checkpoint`` a Qwen2.5-VL one (window attention). Each
folder holds ``config.json``, safetensors, the trained BPE tokenizer
(``pageant.engine.testing``) with the image tokens added, and the processor files, so both
``transformers`` (``AutoProcessor`` / ``AutoModelForImageTextToText``) and the engine load it.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

# "<|role|>\n" blocks as the text chat template; image parts become the model's image placeholder
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}{{ '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
QWEN2_VL_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace("'<image>'", "'<|vision_start|><|image_pad|><|vision_end|>'")


def _tokenizer(path: pathlib.Path, extra_tokens: list[str], chat_template: str):
    from transformers import AutoTokenizer

    from pageant.engine.testing import build_tokenizer

    build_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"additional_special_tokens": extra_tokens})
    tok.chat_template = chat_template
    tok.save_pretrained(str(path))
    return tok


def _spread(model, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():  # the default init makes near-uniform logits; spread them
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15 if "embed" in name else 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)


def _text_config(vocab_size: int, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **extra)


def build_llava_checkpoint(path: str | pathlib.Path, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                           vision_feature_select_strategy: str = "default",
                           vision_feature_layer: int = -2) -> pathlib.Path:
    """A tiny ``LlavaForConditionalGeneration``: CLIP vision tower (hidden 32, 3 layers, 32x32
    images in 8x8 patches: 16 image tokens with the "default" strategy), 2-layer Llama (hidden 64)."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    path = pathlib.Path(path)
    tok = _tokenizer(path, ["<image>"], LLAVA_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(**_text_config(len(tok)))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         vision_feature_layer=vision_feature_layer, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    _spread(model, seed)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(path))
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy=vision_feature_select_strategy,
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    processor.save_pretrained(str(path))
    return path


def _build_qwen_vl(path: str | pathlib.Path, seed: int, max_pixels: int, arch: str,
                   vision: dict[str, Any]) -> pathlib.Path:
    """A tiny Qwen2-VL family checkpoint (``arch``: "Qwen2VL" or "Qwen2_5_VL") with ``vision`` as
    its vision_config and a 2-layer Qwen2 (hidden 64, M-RoPE sections [2, 3, 3] of head_dim 16)."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessor

    from pageant.engine.multimodal.processor import load_hf_processor

    path = pathlib.Path(path)
    tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _tokenizer(path, tokens, QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in tokens}
    text = _text_config(len(tok), rope_theta=1000000.0,
                        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    config = getattr(transformers, f"{arch}Config")(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    model = getattr(transformers, f"{arch}ForConditionalGeneration")(config).to(torch.float32)
    _spread(model, seed)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(path))
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    image_processor.save_pretrained(str(path))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": f"{arch}Processor"}))
    load_hf_processor(path)  # loads (images only when torchvision, for the video part, is missing)
    return path


def build_qwen2_vl_checkpoint(path: str | pathlib.Path, seed: int = 0, max_pixels: int = 56 * 56) -> pathlib.Path:
    """A tiny ``Qwen2VLForConditionalGeneration``: vision transformer (embed 32, 2 layers, 14x14
    patches, 2x2 merge), 2-layer Qwen2 (hidden 64, M-RoPE sections [2, 3, 3] of head_dim 16);
    images are resized to at most ``max_pixels`` pixels (56x56: at most 16 patches, 4 image tokens)."""
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return _build_qwen_vl(path, seed, max_pixels, "Qwen2VL", vision)


def build_qwen2_5_vl_checkpoint(path: str | pathlib.Path, seed: int = 0, max_pixels: int = 112 * 112) -> pathlib.Path:
    """A tiny ``Qwen2_5_VLForConditionalGeneration``: vision transformer (hidden 32, 3 blocks, full
    attention on block 1 only, 56-pixel windows = 2x2 merged tokens, SwiGLU MLP, 14x14 patches,
    2x2 merge), the Qwen2 of ``build_qwen2_vl_checkpoint``; images resized to at most ``max_pixels``."""
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                  fullatt_block_indexes=[1], hidden_act="silu")
    return _build_qwen_vl(path, seed, max_pixels, "Qwen2_5_VL", vision)
