"""Embeddings: the pooler configuration, per-request pooling parameters, and the pooling itself.

A pooling engine (``runner="pooling"``) runs embedding requests through the same scheduler as
generation: prefill only (chunked like any prompt), no token sampled, the KV freed when the prompt
is done. The pooled vector is taken from the model's last hidden state (after its final norm,
what ``transformers.AutoModel`` returns as ``last_hidden_state``):

- ``LAST``: the last prompt token's state (decoder embedding models such as Qwen3-Embedding);
  prefix caching applies (only the last token must be computed);
- ``MEAN``: the mean over every prompt token; ``CLS``: the first token's state. Both need every
  token's state, so those requests skip the prefix cache and accumulate over prefill chunks.

``normalize`` divides by the L2 norm. ``dimensions`` (Matryoshka models only) keeps the first
``dimensions`` features, then normalises again when normalising, as vLLM does.

The pooler comes from the checkpoint's sentence-transformers files, as sentence-transformers and
vLLM read them (``modules.json`` naming a ``Pooling`` module with its ``config.json``, and a
``Normalize`` module), else ``LAST`` + normalise; ``pooler_config`` overrides either field.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass(frozen=True)
class PoolerConfig:
    """How an embedding is pooled: ``pooling_type`` in ``POOLING_TYPES``, ``normalize`` (L2)."""

    pooling_type: str = "LAST"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> "PoolerConfig":
        """``--pooler-config`` JSON (vLLM's keys); unknown keys are refused."""
        if not isinstance(value, dict):
            raise ValueError("pooler config must be a JSON object")
        unknown = sorted(set(value) - {"pooling_type", "normalize"})
        if unknown:
            raise ValueError(f"unknown pooler config keys {unknown}; supported: pooling_type, normalize")
        pooling_type = value.get("pooling_type", "LAST")
        return cls(pooling_type=pooling_type.upper() if isinstance(pooling_type, str) else pooling_type,
                   normalize=value.get("normalize", True))


@dataclass(frozen=True)
class PoolingParams:
    """Per-request pooling options: ``dimensions`` (Matryoshka truncation), ``normalize``
    (None: the engine's pooler setting)."""

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"dimensions must be a positive integer, got {d!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or None, got {self.normalize!r}")


def _st_pooling(path: pathlib.Path) -> dict[str, Any]:
    """What the sentence-transformers files say (empty when there are none)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return {}
    found: dict[str, Any] = {"normalize": False}
    for module in json.loads(modules_file.read_text()):
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            found["normalize"] = True
        elif kind.endswith("Pooling"):
            config_file = path / module.get("path", "1_Pooling") / "config.json"
            if config_file.is_file():
                cfg = json.loads(config_file.read_text())
                modes = {"pooling_mode_lasttoken": "LAST", "pooling_mode_mean_tokens": "MEAN",
                         "pooling_mode_cls_token": "CLS"}
                chosen = [name for key, name in modes.items() if cfg.get(key)]
                others = [k for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                      "pooling_mode_weightedmean_tokens") if cfg.get(k)]
                if others or len(chosen) > 1:
                    raise ValueError(f"{config_file}: pooling {others or chosen} is not supported "
                                     f"(supported: one of {POOLING_TYPES})")
                if chosen:
                    found["pooling_type"] = chosen[0]
    return found


def resolve_pooler_config(path: pathlib.Path, override: PoolerConfig | dict[str, Any] | None) -> PoolerConfig:
    """The checkpoint's sentence-transformers pooling (else LAST + normalise), with ``override``'s
    fields on top (a ``PoolerConfig`` replaces it whole; a dict replaces the keys it names)."""
    if isinstance(override, PoolerConfig):
        return override
    found = {"pooling_type": "LAST", "normalize": True, **_st_pooling(path)}
    return PoolerConfig.from_dict({**found, **(override or {})})


def matryoshka_dimensions(hf_config: dict[str, Any]) -> tuple[int, ...] | None:
    """The dimensions a Matryoshka checkpoint declares (``matryoshka_dimensions``; ``is_matryoshka``
    allows any), or None when truncation is not supported."""
    dims = hf_config.get("matryoshka_dimensions")
    if dims:
        return tuple(int(d) for d in dims)
    return () if hf_config.get("is_matryoshka") else None


@dataclass(eq=False)
class PoolingState:
    """A pooling request's running pool over its prefill chunks (reset when it is recomputed)."""

    pooling_type: str
    normalize: bool
    dimensions: int | None
    total: torch.Tensor | None = None  # MEAN: running sum [hidden] float32; CLS/LAST: the state
    count: int = 0
    embedding: list[float] | None = field(default=None, repr=False)

    @property
    def needs_every_token(self) -> bool:
        return self.pooling_type != "LAST"

    def add(self, hidden: torch.Tensor, start: int) -> None:
        """This chunk's hidden states ``[num_new_tokens, hidden]``, starting at prompt position ``start``."""
        if start == 0:
            self.total, self.count = None, 0
        h = hidden.float()
        if self.pooling_type == "MEAN":
            chunk = h.sum(dim=0)
            self.total = chunk if self.total is None else self.total + chunk
        elif self.pooling_type == "CLS":
            if start == 0:
                self.total = h[0].clone()
        else:
            self.total = h[-1].clone()
        self.count += h.shape[0]

    def finish(self) -> list[float]:
        vec = self.total / self.count if self.pooling_type == "MEAN" else self.total  # [hidden]
        if self.normalize:
            vec = F.normalize(vec, p=2, dim=-1)
        if self.dimensions is not None:
            vec = vec[: self.dimensions]
            if self.normalize:
                vec = F.normalize(vec, p=2, dim=-1)
        self.embedding = vec.cpu().tolist()
        return self.embedding


def new_pooling_state(params: PoolingParams, pooler: PoolerConfig, matryoshka: tuple[int, ...] | None,
                      hidden_size: int) -> PoolingState:
    """A request's pool, its ``dimensions`` checked against what the model declares (ValueError)."""
    dims = params.dimensions
    if dims is not None:
        if matryoshka is None:
            raise ValueError("this model does not support the 'dimensions' parameter (not a Matryoshka model)")
        if dims > hidden_size or (matryoshka and dims not in matryoshka):
            raise ValueError(f"dimensions must be one of {list(matryoshka) or f'1..{hidden_size}'}, got {dims}")
    normalize = pooler.normalize if params.normalize is None else params.normalize
    return PoolingState(pooler.pooling_type, normalize, dims)


def pool_step(scheduled: list, hidden: torch.Tensor, scheduler) -> list:
    """Feed each embedding request of a step its tokens' hidden states (``hidden`` [num_tokens,
    hidden], sequences back to back); finish those whose prompt is done. Returns their requests."""
    done, offset = [], 0
    for s in scheduled:
        pooling = s.seq.request.pooling
        if pooling is not None:
            pooling.add(hidden[offset : offset + s.num_new_tokens], s.start)  # [num_new_tokens, hidden]
            if s.sample:
                pooling.finish()
                s.seq.finish_reason = "stop"
                scheduler.finish(s.seq)
                done.append(s.seq.request)
        offset += s.num_new_tokens
    return done
