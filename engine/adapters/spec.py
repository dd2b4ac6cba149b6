"""What a base model offers to LoRA: its layers, its projections and their shapes.

Projection names are those of the Hugging Face checkpoints (and of PEFT's ``target_modules``),
e.g. Llama's ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` or GPT-NeoX's
``query_key_value dense dense_h_to_4h dense_4h_to_h``. The engine's model fuses some of them into
one matmul (``qkv_proj``, ``gate_up_proj``); ``groups`` says which, in output-column order, so a
fused projection gets its LoRA delta with one shrink and one expand per slice.

Each model family describes itself once with a ``LoRALayout`` (see its module in
``pageant.engine.models``); ``LoRAModelSpec.for_layout`` makes the concrete spec for a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama's


@dataclass(frozen=True)
class LoRALayout:
    """A family's LoRA surface.

    - ``layer_prefix``: the checkpoint path of the decoder layers (``model.layers``);
    - ``parents``: ``(projection, its parent module inside a layer)`` for every projection;
    - ``groups``: ``(our fused module, (projections, in output order))``, covering each once;
    - ``attrs``: ``(our fused module, (parent attribute, attribute))`` inside our decoder layer;
    - ``shapes(cfg)``: ``{projection: (in_features, out_features)}``;
    - ``row_order(projection, cfg)``: for a projection whose output rows the engine re-lays on load
      (GPT-NeoX's per-head fused qkv), the checkpoint row each of our rows comes from; else None.
    """

    layer_prefix: str
    parents: tuple[tuple[str, str], ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    attrs: tuple[tuple[str, tuple[str, str]], ...]
    shapes: Callable[[Any], dict[str, tuple[int, int]]]
    row_order: Callable[[str, Any], "list[int] | None"] | None = None


def _llama_shapes(cfg) -> dict[str, tuple[int, int]]:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


LLAMA_GROUPS = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("o_proj", ("o_proj",)),
    ("gate_up_proj", ("gate_proj", "up_proj")),
    ("down_proj", ("down_proj",)),
)
LLAMA_LORA = LoRALayout(
    layer_prefix="model.layers",
    parents=(("q_proj", "self_attn"), ("k_proj", "self_attn"), ("v_proj", "self_attn"), ("o_proj", "self_attn"),
             ("gate_proj", "mlp"), ("up_proj", "mlp"), ("down_proj", "mlp")),
    groups=LLAMA_GROUPS,
    attrs=(("qkv_proj", ("self_attn", "qkv_proj")), ("o_proj", ("self_attn", "o_proj")),
           ("gate_up_proj", ("mlp", "gate_up_proj")), ("down_proj", ("mlp", "down_proj"))),
    shapes=_llama_shapes,
)
PARENT = dict(LLAMA_LORA.parents)  # Llama's, for callers that build Llama adapters


@dataclass(frozen=True)
class LoRAModelSpec:
    """The base model as LoRA sees it.

    ``shapes[proj] = (in_features, out_features)`` for every projection that may carry an adapter;
    ``groups`` is ``((fused_name, (proj, ...)), ...)`` and covers every projection exactly once;
    ``parents``/``layer_prefix`` spell the PEFT weight names; ``attrs`` find our fused modules;
    ``row_orders[proj]`` re-lays that projection's lora_B rows as the engine re-laid the base rows.
    """

    num_layers: int
    shapes: tuple[tuple[str, tuple[int, int]], ...]
    groups: tuple[tuple[str, tuple[str, ...]], ...] = LLAMA_GROUPS
    layer_prefix: str = "model.layers"
    parents: tuple[tuple[str, str], ...] = LLAMA_LORA.parents
    attrs: tuple[tuple[str, tuple[str, str]], ...] = LLAMA_LORA.attrs
    row_orders: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def shape(self, proj: str) -> tuple[int, int]:
        return dict(self.shapes)[proj]

    def parent(self, proj: str) -> str:
        return dict(self.parents)[proj]

    def module_name(self, layer: int, proj: str) -> str:
        """The checkpoint (and PEFT) name of a projection: ``model.layers.3.self_attn.q_proj``."""
        return f"{self.layer_prefix}.{layer}.{self.parent(proj)}.{proj}"

    def row_order(self, proj: str) -> tuple[int, ...] | None:
        return dict(self.row_orders).get(proj)

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.shapes)

    @classmethod
    def for_layout(cls, layout: LoRALayout, cfg) -> "LoRAModelSpec":
        orders = []
        if layout.row_order is not None:
            for proj, _ in layout.parents:
                order = layout.row_order(proj, cfg)
                if order is not None:
                    orders.append((proj, tuple(order)))
        return cls(num_layers=cfg.num_layers, shapes=tuple(layout.shapes(cfg).items()), groups=layout.groups,
                   layer_prefix=layout.layer_prefix, parents=layout.parents, attrs=layout.attrs,
                   row_orders=tuple(orders))

    @classmethod
    def from_model_config(cls, cfg) -> "LoRAModelSpec":
        """From ``pageant.engine.config.ModelConfig``: the family's own layout (see its model class)."""
        from pageant.engine.models.registry import model_class

        return model_class(cfg.architecture or "LlamaForCausalLM").lora_spec(cfg)
