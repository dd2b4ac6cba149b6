"""Structured outputs through the real openai client against `pageant serve` (a tiny random model:
the constraint must hold whatever the weights): json_schema, json_object, regex, choice and
grammar on chat and completions, the structured_outputs object and the guided_* aliases, streamed
and non-streamed agreeing, and bad constraints refused with the backend's message."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 14},
                                           "units": {"enum": ["metric", "imperial"]}},
          "required": ["city", "days", "units"], "additionalProperties": False}
COMPACT = {"structured_outputs_config_note": None}


@pytest.fixture(scope="module")
def server(serve):
    return serve("--uvicorn-log-level", "warning", "--structured-outputs-config",
                 '{"backend": "xgrammar", "disable_any_whitespace": true}')


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


def model(client) -> str:
    return client.models.list().data[0].id


def test_chat_json_schema(client):
    for seed in range(3):
        resp = client.chat.completions.create(
            model=model(client), messages=[{"role": "user", "content": "weather?"}], max_tokens=100, seed=seed,
            temperature=1.0, n=2,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}})
        for choice in resp.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_completions_and_aliases(client, server):
    m = model(client)
    cases = [
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"structured_outputs": {"regex": r"\d{3}-[a-z]{2}"}}, lambda t: re.fullmatch(r"\d{3}-[a-z]{2}", t)),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[A-Z]{4}"}, lambda t: re.fullmatch("[A-Z]{4}", t)),
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"guided_grammar": 'root ::= "on" | "off"'}, lambda t: t in ("on", "off")),
    ]
    for extra, check in cases:
        resp = client.completions.create(model=m, prompt="Answer:", max_tokens=80, temperature=1.0, seed=1,
                                         extra_body=extra)
        assert resp.choices[0].finish_reason == "stop" and check(resp.choices[0].text), (extra, resp.choices[0].text)


def test_streamed_equals_non_streamed(client):
    kwargs = dict(model=model(client), messages=[{"role": "user", "content": "go"}], max_tokens=80, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), SCHEMA)


@pytest.mark.parametrize("extra, text", [
    ({"guided_regex": "a(b"}, "regex"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "json"),
    ({"guided_grammar": "root ::= ("}, "grammar"),
    ({"guided_regex": "a", "guided_choice": ["x"]}, "one structured-output constraint"),
    ({"structured_outputs": {"regexp": "a"}}, "unknown structured_outputs keys"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"guided_regex": "a", "guided_decoding_backend": "guidance"}, "backend"),
    ({"response_format": {"type": "json_schema"}}, "schema"),
])
def test_bad_constraints_are_400(server, extra, text):
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 5, **extra})
    assert r.status_code == 400, r.text
    assert text in r.json()["error"]["message"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
