"""Engine configuration (what the user asks for) and model configuration (what the checkpoint is).

``EngineConfig`` is frozen. The engine resolves the values left as None (``max_model_len``,
``num_kv_blocks``, ``attention_backend``) into a *new* frozen config with ``dataclasses.replace``;
nothing is mutated after build.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine. ``None`` values are resolved when the engine is built.

    - ``model``: a local checkpoint folder or a Hugging Face hub id (downloaded once).
    - ``max_num_seqs`` / ``max_num_batched_tokens``: the per-step sequence cap and token budget
      (prompts longer than the budget are prefilled in chunks).
    - ``num_kv_blocks``: explicit pool size; otherwise from ``kv_cache_memory_gib`` (CPU) or
      ``gpu_memory_utilization`` (CUDA).
    - ``enable_prefix_caching``: reuse the KV of full blocks shared with earlier requests (same
      tokens from the start, same LoRA adapter, same ``cache_salt``); see block_manager.py.
    """

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    download_dir: str | None = None
    served_model_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    kv_cache_memory_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    attention_backend: str | None = None
    enable_prefix_caching: bool = False
    # CUDA graphs for decode-only steps (cuda + triton, LoRA off); True runs every step eagerly
    enforce_eager: bool = False
    # "auto": the checkpoint's safetensors; "dummy": random weights built on the device from
    # config.json (benchmarks of large shapes without weight files)
    load_format: str = "auto"
    # LoRA (see pageant.engine.adapters): at most max_loras adapters in one batch / on the device,
    # max_cpu_loras (default max_loras) validated adapters cached in host memory
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    allowed_lora_root: str | None = None  # adapter paths must lie under it (None: any local path)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        cpu = self.max_cpu_loras
        if cpu is not None and (not isinstance(cpu, int) or cpu < self.max_loras):
            raise ValueError(f"max_cpu_loras must be an integer >= max_loras ({self.max_loras}), got {cpu!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(f"attention_backend must be 'torch' or 'triton', got {self.attention_backend!r}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``rope_type`` in {"default", "linear", "llama3"} and its parameters."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a Hugging Face ``config.json`` the Llama-family model code needs."""

    arch: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}.get(
                cfg.get("model_type", "")
            )
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        sliding = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rope=_rope_config(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or arch == "qwen2",
            o_bias=bool(cfg.get("attention_bias", False)) and arch != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=cfg,
        )

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path) -> "ModelConfig":
        return cls.from_dict(json.loads((pathlib.Path(path) / "config.json").read_text()))


def _rope_config(cfg: dict[str, Any]) -> RopeConfig:
    """Read rotary settings from either layout: transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=merged.get("original_max_position_embeddings"),
    )


def resolve_max_model_len(requested: int | None, model: ModelConfig) -> int:
    """The context limit: the model's, capped by Mistral's sliding window (we have no sliding-window
    attention, so positions beyond the window would differ from the reference), or the user's."""
    limit = model.max_position_embeddings
    if model.sliding_window is not None and model.sliding_window < limit:
        logger.warning(
            "sliding_window=%d is smaller than max_position_embeddings=%d: capping max_model_len to %d",
            model.sliding_window, limit, model.sliding_window,
        )
        limit = model.sliding_window
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} tokens")
    return requested
