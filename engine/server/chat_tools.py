"""Tool calling and reasoning output for chat completions.

``plan_tools`` reads ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (OpenAI's semantics):

- ``none`` (the default without tools): tools still go to the template, the text is content;
- ``auto`` (the default with tools): the model's text is parsed by ``--tool-call-parser`` (needs
  ``--enable-auto-tool-choice``, as in vLLM); found calls become ``message.tool_calls``;
- ``required``: structured outputs force a JSON array of ``{"name", "parameters"}`` objects, one
  of the tools each (at most one without ``parallel_tool_calls``), so arguments always validate;
- a named function: structured outputs force that function's ``parameters`` object.

``ChoiceOutput`` turns one choice's text into the message (whole) or its deltas (streaming):
reasoning first (``--reasoning-parser``), then tool calls from what follows. Tool calls that were
made end the choice with ``finish_reason: "tool_calls"`` (``auto`` and ``required``; a named
function keeps ``stop``, as OpenAI does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pageant.engine.server import protocol as p
from pageant.engine.server.reasoning import get_reasoning_parser
from pageant.engine.server.tool_parsers import ToolCall, get_tool_parser, make_tool_call_id
from pageant.engine.server.validation import APIError
from pageant.engine.structured_outputs import StructuredOutputsParams

MAX_TOOLS = 128


@dataclass(frozen=True)
class ToolPlan:
    choice: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the named function
    tools: list[dict] | None = None  # for the chat template
    constraint: StructuredOutputsParams | None = None
    parser: str | None = None  # the tool-call parser (auto)


def _parameters(tool: p.ToolDefinition) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def plan_tools(body: p.ChatCompletionRequest, tool_parser: str | None, enable_auto: bool) -> ToolPlan:
    """The request's tool handling (a 400 for what cannot be honoured)."""
    tools = body.tools or []
    if len(tools) > MAX_TOOLS:
        raise APIError(400, f"at most {MAX_TOOLS} tools per request", param="tools")
    names = [t.function.name for t in tools]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    template_tools = [t.model_dump(exclude_none=True) for t in tools] or None
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if choice == "none":
        return ToolPlan("none", tools=template_tools)
    if choice == "auto":
        if not (enable_auto and tool_parser):
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser',
                           param="tool_choice")
        return ToolPlan("auto", tools=template_tools, parser=tool_parser)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                   "parameters": _parameters(t)},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return ToolPlan("required", tools=template_tools, constraint=StructuredOutputsParams(json=schema))
    name = choice.function.name
    if name not in names:
        raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools {names}",
                       param="tool_choice")
    tool = tools[names.index(name)]
    return ToolPlan("named", name=name, tools=template_tools, constraint=StructuredOutputsParams(json=_parameters(tool)))


def _required_calls(text: str) -> list[ToolCall]:
    try:
        items = json.loads(text)
    except ValueError:
        return []  # (cut off by max_tokens: no complete calls)
    return [ToolCall(make_tool_call_id(), it["name"], json.dumps(it["parameters"], ensure_ascii=False))
            for it in items if isinstance(it, dict) and "name" in it and "parameters" in it]


def _out(calls: list[ToolCall]) -> list[p.ToolCallOut] | None:
    return [p.ToolCallOut(id=c.id, function=p.FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls] or None


class ChoiceOutput:
    """One choice's reasoning / content / tool calls, whole (``message``) or streamed (``delta``)."""

    def __init__(self, plan: ToolPlan, reasoning_parser: str | None):
        self.plan = plan
        self.reasoning = get_reasoning_parser(reasoning_parser)() if reasoning_parser else None
        self.tools = get_tool_parser(plan.parser)() if plan.choice == "auto" else None
        self.called = False
        self._buffer = ""  # required: the JSON array, parsed at the end
        self._named_id: str | None = None

    def finish_reason(self, reason: str | None) -> str | None:
        if reason == "stop" and self.called and self.plan.choice in ("auto", "required"):
            return "tool_calls"
        return reason

    # ------------------------------------------------------------------ whole
    def message(self, text: str) -> p.ChatResponseMessage:
        reasoning, content = self.reasoning.extract(text) if self.reasoning else (None, text)
        calls: list[ToolCall] = []
        content = content or ""
        if self.plan.choice == "auto":
            found = self.tools.extract(content)
            if found.tools_called:
                calls, content = found.tool_calls, found.content or ""
        elif self.plan.choice == "required":
            calls, content = _required_calls(content), ""
        elif self.plan.choice == "named":
            calls, content = [ToolCall(make_tool_call_id(), self.plan.name, content)], ""
        self.called = bool(calls)
        return p.ChatResponseMessage(content=content if content or not calls else None, tool_calls=_out(calls),
                                     reasoning_content=reasoning)

    # ------------------------------------------------------------------ streaming
    def delta(self, text: str) -> p.DeltaMessage | None:
        """The delta for new output ``text`` (None when there is nothing to send yet)."""
        reasoning, content = self.reasoning.stream(text) if self.reasoning else (None, text)
        return self._content_delta(reasoning, content, final=False)

    def finish(self) -> p.DeltaMessage | None:
        reasoning, content = self.reasoning.finish() if self.reasoning else (None, None)
        return self._content_delta(reasoning, content, final=True)

    def _content_delta(self, reasoning: str | None, content: str | None, final: bool) -> p.DeltaMessage | None:
        text, calls = None, []
        choice = self.plan.choice
        if choice in ("none",):
            text = content
        elif choice == "auto":
            parts = [self.tools.stream(content)] if content else []
            if final:
                parts.append(self.tools.finish())
            for dm in parts:
                if dm is None:
                    continue
                text = ((text or "") + (dm.content or "")) or None
                calls += [p.DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                                          function=p.DeltaFunctionCall(name=d.name, arguments=d.arguments))
                          for d in dm.tool_calls]
        elif choice == "named":
            if self._named_id is None and (content or final):
                self._named_id = make_tool_call_id()
                calls.append(p.DeltaToolCall(index=0, id=self._named_id, type="function",
                                             function=p.DeltaFunctionCall(name=self.plan.name, arguments="")))
            if content:
                calls.append(p.DeltaToolCall(index=0, function=p.DeltaFunctionCall(arguments=content)))
        else:  # required: the array is parsed once complete
            self._buffer += content or ""
            if final:
                for i, call in enumerate(_required_calls(self._buffer)):
                    calls.append(p.DeltaToolCall(index=i, id=call.id, type="function",
                                                 function=p.DeltaFunctionCall(name=call.name, arguments="")))
                    calls.append(p.DeltaToolCall(index=i, function=p.DeltaFunctionCall(arguments=call.arguments)))
        self.called = self.called or bool(calls)
        if not (reasoning or text or calls):
            return None
        return p.DeltaMessage(content=text or None, reasoning_content=reasoning or None, tool_calls=calls or None)
