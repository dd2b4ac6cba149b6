"""``SpeculativeConfig``: the validated form of ``EngineConfig.speculative_config`` (vLLM's keys).

``{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}``
proposes by prompt lookup; ``{"model": "path/to/small", "num_speculative_tokens": 3}`` (method
``"draft_model"``, implied by ``model``) runs a smaller checkpoint with the same vocabulary.
``disable_by_batch_size``: no proposals in a step with more running requests than that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft_model")
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
        "disable_by_batch_size")
MAX_SPECULATIVE_TOKENS = 16


def _positive_int(name: str, value: Any, upper: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (upper is not None and value > upper):
        bound = f" (at most {upper})" if upper is not None else ""
        raise ValueError(f"speculative_config {name} must be a positive integer{bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class SpeculativeConfig:
    """How proposals are made and how many per step; see the module docstring for the keys."""

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int = 0
    prompt_lookup_max: int = 0
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> "SpeculativeConfig":
        """Validate vLLM's ``speculative_config`` dict; ``ValueError`` naming the bad key."""
        if not isinstance(raw, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"supported: {', '.join(KEYS)}")
        model = raw.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError("speculative_config model must be a non-empty path or hub id")
        method = raw.get("method") or ("draft_model" if model is not None else None)
        if method is None:
            raise ValueError("speculative_config needs a method ('ngram' or 'draft_model') or a draft 'model'")
        if method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(METHODS)}, got {method!r}")
        if method == "draft_model" and model is None:
            raise ValueError("speculative_config method 'draft_model' needs a 'model' (the draft checkpoint)")
        if method == "ngram" and model is not None:
            raise ValueError("speculative_config method 'ngram' takes no 'model'")
        if "num_speculative_tokens" not in raw:
            raise ValueError("speculative_config needs num_speculative_tokens")
        k = _positive_int("num_speculative_tokens", raw["num_speculative_tokens"], MAX_SPECULATIVE_TOKENS)
        lo, hi = raw.get("prompt_lookup_min"), raw.get("prompt_lookup_max")
        if method == "ngram":  # vLLM's defaults: one given sets the other; neither: 5 and 5
            lo, hi = (5, 5) if lo is None and hi is None else (hi if lo is None else lo, lo if hi is None else hi)
            lo, hi = _positive_int("prompt_lookup_min", lo), _positive_int("prompt_lookup_max", hi)
            if lo > hi:
                raise ValueError(f"speculative_config prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
        elif lo is not None or hi is not None:
            raise ValueError("speculative_config prompt_lookup_min/max apply to method 'ngram' only")
        disable = raw.get("disable_by_batch_size")
        if disable is not None:
            disable = _positive_int("disable_by_batch_size", disable)
        return cls(method=method, num_speculative_tokens=k, model=model, prompt_lookup_min=lo or 0,
                   prompt_lookup_max=hi or 0, disable_by_batch_size=disable)
