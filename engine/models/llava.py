"""LLaVA-1.5 style vision-language models (``LlavaForConditionalGeneration``).

A CLIP (or SigLIP-shaped) vision tower, an MLP projector and a Llama-family language model
(``llama.py``, the shared layers). The image features are the hidden states of
``vision_feature_layer`` (CLS dropped for the "default" ``vision_feature_select_strategy``),
projected to the text width; the engine places them at the image placeholder tokens
(``pageant.engine.multimodal``). Checkpoint names: the llava-hf layout (``language_model.model.*``,
``vision_tower.vision_model.*``) and transformers 5's (``model.language_model.*``, ``model.vision_tower.*``).
"""

from __future__ import annotations

import dataclasses
import re
from types import ModuleType
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pageant.engine.config import ModelConfig
from pageant.engine.layers.parallel import SINGLE, ParallelState
from pageant.engine.models import llama
from pageant.engine.models.base import CausalLM
from pageant.engine.models.utils import SKIP, load_stacked

_ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in _ACTS:
        raise ValueError(f"unsupported vision activation {name!r}; supported: {sorted(_ACTS)}")
    return _ACTS[name]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The language model's fields (what the KV cache and decoder need); ``raw`` keeps the whole config."""
    text = dict(hf["text_config"])
    text.pop("architectures", None)
    text.setdefault("model_type", "llama")
    cfg = llama.config_from_hf(text)
    return dataclasses.replace(cfg, arch="llava", architecture=hf.get("architectures", ["LlavaForConditionalGeneration"])[0],
                               raw=hf)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head attention over one image's patches."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [images, patches, hidden] -> same
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [b, n, hidden] -> [b, heads, n, head_dim]
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm ViT block: ``x + attn(ln1(x))``, then ``x + fc2(act(fc1(ln2(x))))``."""

    def __init__(self, vc: dict[str, Any]):
        super().__init__()
        hidden, eps = vc["hidden_size"], vc.get("layer_norm_eps", 1e-5)
        self.self_attn = CLIPAttention(hidden, vc["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(hidden, vc["intermediate_size"])
        self.mlp.fc2 = nn.Linear(vc["intermediate_size"], hidden)
        self.act = activation(vc.get("hidden_act", "quick_gelu"))
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [images, patches, hidden] -> same
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class CLIPVisionTower(nn.Module):
    """CLIP's vision transformer; ``forward`` returns the hidden states after ``num_layers`` layers
    (layer 0 = the pre-norm embeddings, as Hugging Face's ``hidden_states`` count them)."""

    def __init__(self, vc: dict[str, Any]):
        super().__init__()
        hidden, patch = vc["hidden_size"], vc["patch_size"]
        self.image_size, self.patch_size = vc["image_size"], patch
        num_positions = (self.image_size // patch) ** 2 + 1
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.empty(hidden))
        self.embeddings.patch_embedding = nn.Conv2d(vc.get("num_channels", 3), hidden, patch, patch, bias=False)
        self.embeddings.position_embedding = nn.Embedding(num_positions, hidden)
        eps = vc.get("layer_norm_eps", 1e-5)
        self.pre_layrnorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(vc) for _ in range(vc["num_hidden_layers"]))
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)  # loaded, unused (pooled output only)

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        # pixel_values: [images, channels, H, W] -> [images, 1 + patches, hidden]
        emb = self.embeddings
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))  # [b, hidden, g, g]
        patches = patches.flatten(2).transpose(1, 2)  # [b, patches, hidden]
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight[None]  # [b, 1 + patches, hidden]
        x = self.pre_layrnorm(x)
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
        return x


class LlavaMultiModalProjector(nn.Module):
    """``linear_2(act(linear_1(features)))``: vision width -> text width."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., vision_hidden] -> [..., text_hidden]
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(CausalLM):
    """Vision tower + projector + ``LlamaForCausalLM`` (``language_model``)."""

    supports_multimodal = True

    def __init__(self, config: ModelConfig, ops: ModuleType, max_position: int, parallel: ParallelState = SINGLE):
        if parallel.tp_size * parallel.pp_size > 1:
            raise ValueError("vision-language models run on one process: tensor/pipeline_parallel_size must be 1")
        super().__init__(config, ops, max_position, parallel)
        hf = config.raw
        vc = hf["vision_config"]
        if vc.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"unsupported LLaVA vision tower {vc.get('model_type')!r}; supported: clip_vision_model")
        layer = hf.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError("a list of vision_feature_layer values is not supported yet")
        self.feature_layers = layer % (vc["num_hidden_layers"] + 1)  # index into [embeddings, layer 1, ...]
        self.select_strategy = hf.get("vision_feature_select_strategy", "default")
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {self.select_strategy!r}")
        self.vision_tower = CLIPVisionTower(vc)
        self.multi_modal_projector = LlavaMultiModalProjector(
            vc["hidden_size"], config.hidden_size, hf.get("projector_hidden_act", "gelu"),
            bool(hf.get("multimodal_projector_bias", True)))
        self.language_model = llama.LlamaForCausalLM(config, ops, max_position, parallel)

    # ------------------------------------------------------------------ the multimodal contract
    @staticmethod
    def mm_prompt_placeholder(image_token: str) -> str:
        return image_token

    @staticmethod
    def mm_split_items(out, num_images: int, hf: dict[str, Any]) -> tuple[list[dict], list[int]]:
        """Per image: its ``pixel_values`` ``[1, 3, H, W]`` and its number of image tokens."""
        vc = hf["vision_config"]
        n = (vc["image_size"] // vc["patch_size"]) ** 2 + (hf.get("vision_feature_select_strategy") == "full")
        pv = out["pixel_values"]  # [images, 3, H, W]
        return [{"pixel_values": pv[i : i + 1]} for i in range(num_images)], [n] * num_images

    def encode_images(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """One batched tower run for the step's images -> per image ``[num_image_tokens, hidden]``."""
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        device = self.multi_modal_projector.linear_1.weight.device
        pixels = torch.cat([it["pixel_values"] for it in items]).to(device, dtype)  # [images, 3, H, W]
        feats = self.vision_tower(pixels, self.feature_layers)  # [images, 1 + patches, vision_hidden]
        if self.select_strategy == "default":
            feats = feats[:, 1:]
        return list(self.multi_modal_projector(feats))  # images x [tokens, hidden]

    def get_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden]
        return self.language_model.model.embed_tokens(input_ids)

    # ------------------------------------------------------------------ CausalLM
    def embedding(self) -> nn.Module:
        return self.language_model.model.embed_tokens

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def tie_weights(self) -> None:
        if hasattr(self, "language_model"):
            self.language_model.tie_weights()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        return self.language_model.compute_logits(hidden)

    def forward(self, input_ids: torch.Tensor,  # [num_tokens] int64
                positions: torch.Tensor,  # [num_tokens] int64
                kv_cache: torch.Tensor, md, intermediate: dict | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:  # [num_tokens, hidden]
        lm = self.language_model.model
        if inputs_embeds is None:
            return lm(input_ids, positions, kv_cache, md)
        x, residual = inputs_embeds, None  # [num_tokens, hidden]
        for i in range(lm.start_layer, lm.end_layer):
            x, residual = lm.layers[i](positions, x, residual, kv_cache[i - lm.start_layer], md)
        return lm.norm(x, residual)[0]

    _RENAMES = ((r"^model\.language_model\.", "language_model.model."), (r"^model\.vision_tower\.", "vision_tower."),
                (r"^model\.multi_modal_projector\.", "multi_modal_projector."), (r"^lm_head\.", "language_model.lm_head."),
                (r"^vision_tower\.vision_model\.", "vision_tower."))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        text, rest = [], []
        for name, tensor in weights:
            for pattern, repl in self._RENAMES:
                name = re.sub(pattern, repl, name)
            if name.startswith("language_model."):
                text.append((name[len("language_model."):], tensor))
            elif "position_ids" not in name:
                rest.append((name, tensor))
        loaded = {f"language_model.{k}" for k in self.language_model.load_weights(text)}
        return loaded | load_stacked(self, rest, (), lambda n, t: SKIP if n.startswith("language_model.") else (n, t))
