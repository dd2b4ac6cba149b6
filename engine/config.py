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
    # KV-cache element type (vLLM's names): "auto" = the model dtype; "fp8" / "fp8_e4m3" = float8
    # e4m3 with per-layer k/v scales from the checkpoint (else 1.0), 1 byte an element
    kv_cache_dtype: str = "auto"
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
    # "generate" (text generation) or "pooling" (embeddings, see pageant.engine.pooling);
    # pooler_config overrides the checkpoint's pooling ({"pooling_type": ..., "normalize": ...})
    runner: str = "generate"
    pooler_config: dict[str, Any] | None = None
    # structured outputs: {"backend": "auto" | "xgrammar" | "guidance", "disable_any_whitespace": bool,
    # "reasoning_parser": "deepseek_r1" | "qwen3" (the constraint starts after the reasoning)}
    structured_outputs_config: dict[str, Any] | None = None
    # weight quantization (vLLM's names): None detects the checkpoint's quantization_config
    # (compressed-tensors); "fp8" quantizes a float checkpoint's linear weights to FP8 on load
    quantization: str | None = None
    # speculative decoding (vLLM's keys, see pageant.engine.spec_decode.config): {"method": "ngram" |
    # "draft_model", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
    # "disable_by_batch_size"}; None: off
    speculative_config: dict[str, Any] | None = None
    # vision-language models (vLLM's name): at most this many items per prompt, e.g. {"image": 4}
    limit_mm_per_prompt: dict[str, int] | None = None
    # parallelism (see pageant.engine.distributed): tensor_parallel_size x pipeline_parallel_size
    # ranks, one worker process each (gloo on the CPU, NCCL on CUDA), spread over nnodes nodes;
    # this process is node node_rank; the rendezvous is master_addr:master_port (None: the
    # MASTER_ADDR / MASTER_PORT environment that torchrun and LeaderWorkerSet set, else a free
    # local port); a collective that waits longer than distributed_timeout_seconds fails the engine
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    distributed_timeout_seconds: float = 120.0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

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
        from pageant.engine.layers.attention import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("max_loras", "max_lora_rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        cpu = self.max_cpu_loras
        if cpu is not None and (not isinstance(cpu, int) or cpu < self.max_loras):
            raise ValueError(f"max_cpu_loras must be an integer >= max_loras ({self.max_loras}), got {cpu!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.runner not in ("generate", "pooling"):
            raise ValueError(f"runner must be 'generate' or 'pooling', got {self.runner!r}")
        if self.pooler_config is not None and not isinstance(self.pooler_config, dict):
            raise ValueError("pooler_config must be a dict such as {'pooling_type': 'MEAN', 'normalize': True}")
        so = self.structured_outputs_config
        if so is not None:
            if not isinstance(so, dict) or set(so) - {"backend", "disable_any_whitespace", "reasoning_parser"}:
                raise ValueError("structured_outputs_config takes the keys 'backend', 'disable_any_whitespace' "
                                 "and 'reasoning_parser'")
            if so.get("backend", "auto") not in ("auto", "xgrammar", "guidance"):
                raise ValueError(f"structured outputs backend must be auto, xgrammar or guidance, got {so.get('backend')!r}")
        if self.quantization is not None:
            from pageant.engine.layers.quantization import SUPPORTED_QUANTIZATION

            if self.quantization not in SUPPORTED_QUANTIZATION:
                raise ValueError(f"unsupported quantization {self.quantization!r}; supported: "
                                 f"{', '.join(SUPPORTED_QUANTIZATION)} (or None to detect the checkpoint's)")
        self._check_parallel()
        mm = self.limit_mm_per_prompt
        if mm is not None and (not isinstance(mm, dict) or set(mm) - {"image"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in mm.values())):
            raise ValueError(f"limit_mm_per_prompt must be a dict like {{'image': 4}} (counts >= 0), got {mm!r}")
        if self.speculative_config is not None:
            from pageant.engine.spec_decode.config import SpeculativeConfig

            SpeculativeConfig.from_dict(self.speculative_config)
            if self.world_size > 1:
                raise ValueError("speculative decoding (speculative_config) runs on one process: it does not support "
                                 "tensor_parallel_size or pipeline_parallel_size > 1")
            if self.runner == "pooling":
                raise ValueError("speculative_config applies to text generation, not runner='pooling'")
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(f"attention_backend must be 'torch' or 'triton', got {self.attention_backend!r}")

    def _check_parallel(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank!r}")
        if self.world_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size ({self.world_size}) must be a multiple "
                             f"of nnodes ({self.nnodes}): every node runs the same number of ranks")
        if self.master_port is not None and (not isinstance(self.master_port, int) or not 0 < self.master_port < 65536):
            raise ValueError(f"master_port must be a TCP port in [1, 65535], got {self.master_port!r}")
        if not self.distributed_timeout_seconds > 0:
            raise ValueError("distributed_timeout_seconds must be > 0")


ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``rope_type`` in ``ROPE_TYPES`` and its parameters (transformers' names).

    ``factor`` is None when the checkpoint gives none (longrope then derives it from the lengths).
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @property
    def scale(self) -> float:
        """``factor``, 1.0 when absent."""
        return 1.0 if self.factor is None else self.factor


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs from a Hugging Face ``config.json``, read by the family's module.

    ``arch`` names the family module (``pageant.engine.models.<arch>``); ``architecture`` the
    checkpoint's class. ``layer_sliding_windows[i]`` is layer ``i``'s attention window (None: full
    attention). The family-specific switches live here too, typed, so models never read ``raw``.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the eps of every norm of the model (RMSNorm or LayerNorm)
    max_position_embeddings: int
    rope: RopeConfig
    architecture: str = ""
    rotary_dim: int | None = None  # None: head_dim (partial rotary otherwise)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # the largest window of any layer
    layer_sliding_windows: tuple[int | None, ...] = ()
    parallel_residual: bool = False  # attention and MLP read the same input (GPT-NeoX, Falcon)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None  # attention scale is its -0.5 power (Gemma 2)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    family_options: tuple[tuple[str, Any], ...] = ()  # a family's own switches, e.g. Falcon's qkv layout
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.family_options).get(name, default)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Find the family in the registry; its module reads the config (unsupported: ValueError)."""
        from pageant.engine.models.registry import resolve_architecture

        return resolve_architecture(cfg).config_from_hf(cfg)

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path) -> "ModelConfig":
        return cls.from_dict(json.loads((pathlib.Path(path) / "config.json").read_text()))


def common_fields(cfg: dict[str, Any], arch: str, **overrides: Any) -> dict[str, Any]:
    """The ``ModelConfig`` fields most families spell the Llama way; ``overrides`` win."""
    from pageant.engine.models.registry import architecture_of

    num_heads = cfg["num_attention_heads"]
    num_layers = cfg["num_hidden_layers"]
    eos = cfg.get("eos_token_id")
    fields: dict[str, Any] = dict(
        arch=arch,
        architecture=architecture_of(cfg),
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg.get("intermediate_size") or 4 * cfg["hidden_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rope=rope_config(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hidden_act=cfg.get("hidden_act") or "silu",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        raw=cfg,
    )
    fields.update(overrides)
    head_dim = fields["head_dim"]
    factor = partial_rotary_factor(cfg)
    if fields.get("rotary_dim") is None and factor != 1.0:
        fields["rotary_dim"] = int(head_dim * factor)
    windows = fields.get("layer_sliding_windows") or ()
    if not windows and fields.get("sliding_window") is not None:
        windows = (fields["sliding_window"],) * num_layers
    fields["layer_sliding_windows"] = tuple(windows) or (None,) * num_layers
    live = [w for w in fields["layer_sliding_windows"] if w is not None]
    fields["sliding_window"] = max(live) if live else None
    return fields


def partial_rotary_factor(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))


def rope_config(cfg: dict[str, Any], theta_key: str = "rope_theta") -> RopeConfig:
    """Read rotary settings from either layout: transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get(theta_key, cfg.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    rope_type = {"su": "longrope", "dynamic_ntk": "dynamic"}.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    original = merged.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
    if rope_type == "longrope" and not (merged.get("short_factor") and merged.get("long_factor")):
        raise ValueError("longrope rope scaling needs short_factor and long_factor")

    def opt(name: str) -> float | None:
        return None if merged.get(name) is None else float(merged[name])

    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=opt("factor"),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        attention_factor=opt("attention_factor"),
        truncate=bool(merged.get("truncate", True)),
        short_factor=tuple(float(x) for x in merged.get("short_factor") or ()),
        long_factor=tuple(float(x) for x in merged.get("long_factor") or ()),
    )


def resolve_max_model_len(requested: int | None, model: ModelConfig) -> int:
    """The context limit: the model's ``max_position_embeddings``, or the user's if not above it.
    Sliding-window layers attend only their window (see ``pageant.engine.layers.attention``)."""
    limit = model.max_position_embeddings
    if requested is None:
        return limit
    if requested > limit:
        raise ValueError(f"max_model_len={requested} exceeds the model's limit of {limit} tokens")
    return requested
