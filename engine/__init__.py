"""The inference engine: paged KV cache, continuous batching, OpenAI-compatible server.

Public names: ``LLM`` (offline), ``LLMEngine`` (online, single-threaded), ``EngineConfig``,
``SamplingParams`` (and its ``RequestOutputKind``), ``BeamSearchParams``, the output dataclasses and the exceptions. Heavy modules (torch, the model
code) load lazily on first use of ``LLM``/``LLMEngine``/``EngineConfig``.
"""

from pageant.engine.exceptions import EngineStepError, InvalidRequestError
from pageant.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from pageant.engine.sampling_params import RequestOutputKind, SamplingParams
from pageant.engine.structured_outputs.params import StructuredOutputsParams

__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "SamplingParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "RequestMetrics",
    "InvalidRequestError",
    "EngineStepError",
    "LoRARequest",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
    "PoolingParams",
    "EmbeddingRequestOutput",
    "StructuredOutputsParams",
]

_LAZY = {
    "LLM": "pageant.engine.llm",
    "LLMEngine": "pageant.engine.engine",
    "EngineConfig": "pageant.engine.config",
    "LoRARequest": "pageant.engine.lora",
    "BeamSearchParams": "pageant.engine.beam_search",
    "BeamSearchOutput": "pageant.engine.beam_search",
    "BeamSearchSequence": "pageant.engine.beam_search",
    "PoolingParams": "pageant.engine.pooling",
    "EmbeddingRequestOutput": "pageant.engine.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pageant.engine' has no attribute {name!r}")
