"""Speculative decoding: proposals (n-gram prompt lookup or a draft model) verified by one target
forward, with rejection sampling so outputs are distributed exactly as without speculation.

``config.py`` validates ``speculative_config``; ``ngram.py`` and ``draft.py`` propose;
``rejection_sampler.py`` accepts or rejects; ``verify.py`` turns the target's logits into emitted
tokens; ``decoder.py`` is the engine's hook; ``metrics.py`` counts drafts and accepted tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pageant.engine.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from pageant.engine.config import EngineConfig


def target_runner_class(config: "EngineConfig"):
    """The target's ``ModelRunner`` class: with a draft model (and a pool sized from memory), one
    whose pool leaves room for the draft's pool of as many blocks."""
    from pageant.engine.model_runner import ModelRunner

    spec = config.speculative_config
    if spec is None or not spec.get("model") or config.num_kv_blocks:
        return ModelRunner
    from pageant.engine.spec_decode.draft import joint_runner_class

    return joint_runner_class(config, spec["model"])


__all__ = ["SpeculativeConfig", "target_runner_class"]
