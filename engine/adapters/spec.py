"""What a base model offers to LoRA: its layers, its projections and their shapes.

Projection names are those of the Hugging Face checkpoints (and of PEFT's ``target_modules``):
``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``. The engine's model fuses some of
them into one matmul (``qkv_proj``, ``gate_up_proj``); ``groups`` says which, in output-column
order, so a fused projection gets its LoRA delta with one shrink and one expand per slice.
"""

from __future__ import annotations

from dataclasses import dataclass

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_GROUPS = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("o_proj", ("o_proj",)),
    ("gate_up_proj", ("gate_proj", "up_proj")),
    ("down_proj", ("down_proj",)),
)
# where each projection sits in a decoder layer (the PEFT weight names use it)
PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


@dataclass(frozen=True)
class LoRAModelSpec:
    """The base model as LoRA sees it.

    ``shapes[proj] = (in_features, out_features)`` for every projection that may carry an adapter;
    ``groups`` is ``((fused_name, (proj, ...)), ...)`` and covers every projection exactly once.
    """

    num_layers: int
    shapes: tuple[tuple[str, tuple[int, int]], ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...] = LLAMA_GROUPS

    def shape(self, proj: str) -> tuple[int, int]:
        return dict(self.shapes)[proj]

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shapes)

    @classmethod
    def from_model_config(cls, cfg) -> "LoRAModelSpec":
        """From ``pageant.engine.config.ModelConfig`` (any Llama-family model)."""
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        h, i = cfg.hidden_size, cfg.intermediate_size
        shapes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        return cls(num_layers=cfg.num_layers, shapes=tuple(shapes.items()))
