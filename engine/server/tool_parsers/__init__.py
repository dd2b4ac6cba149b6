"""Tool-call parsers for the OpenAI chat API (``--tool-call-parser``), with vLLM's names.

``TOOL_PARSERS`` maps a name to its class; ``get_tool_parser(name)`` looks one up. Each parser
splits a model's output into content and tool calls, for the whole output (``extract``) or while it
streams (``stream`` / ``finish``, one instance per choice); see ``base`` for the shared semantics.
"""

from __future__ import annotations

from .base import DeltaMessage, ExtractedToolCalls, ToolCall, ToolCallDelta, ToolParser, make_tool_call_id
from .hermes import HermesToolParser
from .llama3_json import Llama3JsonToolParser
from .mistral import MistralToolParser
from .pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class called ``name``; ValueError (listing the choices) for an unknown one."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of: {', '.join(sorted(TOOL_PARSERS))}") from None


__all__ = ["TOOL_PARSERS", "DeltaMessage", "ExtractedToolCalls", "HermesToolParser", "Llama3JsonToolParser",
           "MistralToolParser", "PythonicToolParser", "ToolCall", "ToolCallDelta", "ToolParser", "get_tool_parser",
           "make_tool_call_id"]
