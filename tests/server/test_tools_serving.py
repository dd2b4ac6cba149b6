"""Tool calling and reasoning output through the real openai client against `pageant serve` with
a tiny random model and a Hermes/Qwen2.5-style tool template: tool_choice required and named are
enforced by structured outputs (arguments validate), auto parses hermes calls (the model is steered
into writing one with a regex constraint), streamed tool calls assemble to the non-streamed ones,
tools and tool results reach the template, and --reasoning-parser splits reasoning_content."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from pageant.engine.testing import TOOL_CHAT_TEMPLATE

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def long_checkpoint(make_checkpoint):
    return make_checkpoint("llama", max_position_embeddings=2048)  # the tools prompt is long for its tokenizer


@pytest.fixture(scope="module")
def server(serve, tmp_path_factory, long_checkpoint):
    template = tmp_path_factory.mktemp("tpl") / "tools.jinja"
    template.write_text(TOOL_CHAT_TEMPLATE)
    return serve("--uvicorn-log-level", "warning", "--chat-template", str(template), "--enable-auto-tool-choice",
                 "--tool-call-parser", "hermes", "--structured-outputs-config", '{"disable_any_whitespace": true}',
                 model=long_checkpoint)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


def model(client) -> str:
    return client.models.list().data[0].id


def assemble(stream) -> tuple[dict[int, dict], str, str | None]:
    """Streamed tool-call deltas put together: {index: {id, name, arguments}}, content, finish reason."""
    calls: dict[int, dict] = {}
    content, reason = "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert call["id"] in (None, d.id)
                call["id"] = d.id
            if d.function and d.function.name:
                call["name"] = d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
        reason = choice.finish_reason or reason
    return calls, content, reason


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_calls_validate(client, parallel):
    for seed in range(3):
        resp = client.chat.completions.create(model=model(client), messages=MESSAGES, tools=TOOLS,
                                              tool_choice="required", parallel_tool_calls=parallel, max_tokens=150,
                                              temperature=1.0, seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        assert parallel or len(choice.message.tool_calls) == 1
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_function_and_streaming_agree(client):
    kwargs = dict(model=model(client), messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kwargs).choices[0]
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and whole.message.content is None
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    calls, content, _ = assemble(client.chat.completions.create(stream=True, **kwargs))
    assert content == "" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == call.function.arguments
    # required, streamed: the same calls as non-streamed
    kwargs["tool_choice"] = "required"
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, _, reason = assemble(client.chat.completions.create(stream=True, **kwargs))
    assert reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_auto_parses_hermes_calls(client):
    forced = r'Sure\.\n<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "(UTC|CET)"\}\}\n</tool_call>'
    kwargs = dict(model=model(client), messages=MESSAGES, tools=TOOLS, max_tokens=80, temperature=0,
                  extra_body={"structured_outputs": {"regex": forced}})
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure.\n"  # (kept verbatim, as vLLM)
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    calls, content, reason = assemble(client.chat.completions.create(stream=True, **kwargs))
    assert content == "Sure.\n" and reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_time", call.function.arguments)]
    # plain text with tools: no calls, the text stays content
    plain = client.chat.completions.create(model=model(client), messages=MESSAGES, tools=TOOLS, max_tokens=5,
                                           temperature=0, extra_body={"structured_outputs": {"regex": "[a-z ]{5}"}})
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason != "tool_calls"


def test_tools_and_tool_results_reach_the_template(client, server, long_checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(long_checkpoint)
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    resp = client.chat.completions.create(model=model(client), messages=history, tools=TOOLS, max_tokens=2,
                                          tool_choice="none")
    history_for_template = [dict(m) for m in history]
    history_for_template[1] = {**history[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]}
    text = tok.apply_chat_template(history_for_template, tools=TOOLS, chat_template=TOOL_CHAT_TEMPLATE,
                                   add_generation_prompt=True, tokenize=False)
    assert "<tools>" in text and "sunny, 21 C" in text and '"arguments": {"city": "Paris", "days": 2}' in text
    assert resp.usage.prompt_tokens == len(tok(text).input_ids)


@pytest.mark.parametrize("body, text", [
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, ""),
])
def test_bad_tool_requests(server, body, text):
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, **body})
    assert r.status_code in (400, 422) and text in r.json()["error"]["message"], r.text


def test_auto_needs_the_flags_and_reasoning_is_split(serve, tiny_checkpoint):
    plain = serve("--uvicorn-log-level", "warning")
    r = httpx.post(f"{plain.base_url}/v1/chat/completions", json={"messages": MESSAGES, "tools": TOOLS, "max_tokens": 3})
    assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]
    baseline = httpx.post(f"{plain.base_url}/v1/chat/completions",
                          json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0}).json()
    text = baseline["choices"][0]["message"]["content"]
    # deepseek_r1: no </think> in the output, so all of it is reasoning
    r1 = serve("--uvicorn-log-level", "warning", "--reasoning-parser", "deepseek_r1")
    client = openai.OpenAI(base_url=f"{r1.base_url}/v1", api_key="none", max_retries=0)
    m = client.models.list().data[0].id
    msg = client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=12, temperature=0).choices[0].message
    assert msg.content in (None, "") and msg.model_extra["reasoning_content"] == text
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                       for c in client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=12, temperature=0,
                                                               stream=True) if c.choices)
    assert streamed == text
