"""Every response shape of a real `pageant serve` against OpenAI's own published API document.

The document is openai/openai-openapi's ``openapi.yaml`` (OpenAPI 3.1, in $PAGEANT_SCHEMAS_DIR). It
marks nullable fields the OpenAPI 3.0 way (``nullable: true``), which JSON Schema ignores: each such
schema is turned into ``anyOf: [<schema>, {type: null}]`` before validating. ``$ref``s are resolved by
a ``referencing`` registry holding the whole document, and each body is validated (JSON Schema
2020-12, OpenAPI 3.1's dialect) against one of its component schemas.

vLLM's extra fields (``stop_reason`` on choices, ``root``/``parent``/``max_model_len`` on models) stay:
none of the schemas checked here forbids additional properties (asserted below, so a future document
that does is noticed).

One deliberate allowance: the document says streamed completions share ``CreateCompletionResponse``
with the non-streamed reply, whose ``finish_reason`` is a non-null string, but a choice has no finish
reason until its last chunk (OpenAI's own streams send ``"finish_reason": null`` there, as vLLM does).
Chunks are validated against that schema with only ``finish_reason`` made nullable, and each choice's
last chunk against the schema unchanged.
"""

from __future__ import annotations

import copy
import json

import httpx
import jsonschema
import pytest
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.conftest import require_schemas_dir

API_KEY = "schema-key"
MODEL = "tiny"
OPENAI_DOC = "openai-openapi.yaml"  # openai/openai-openapi's openapi.yaml, in $PAGEANT_SCHEMAS_DIR
DOC_URI = "urn:openai-openapi"
STREAMED_COMPLETION = "PageantTest_StreamedCompletionChunk"  # added by this test, not OpenAI's


class _Loader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):
    """Safe YAML loading that keeps dates as strings (JSON has no dates)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _Loader.yaml_implicit_resolvers.copy().items()
}


def _nulls_to_json_schema(node):
    """``nullable: true`` (OpenAPI 3.0) → ``anyOf: [<schema without it>, {type: null}]``, everywhere."""
    if isinstance(node, list):
        return [_nulls_to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nulls_to_json_schema(v) for k, v in node.items()}
    if out.get("nullable") is True:
        out.pop("nullable")
        return {"anyOf": [out, {"type": "null"}]}
    out.pop("nullable", None)
    return out


@pytest.fixture(scope="module")
def openai_doc() -> dict:
    path = require_schemas_dir(OPENAI_DOC) / OPENAI_DOC
    doc = yaml.load(path.read_text(), Loader=_Loader)
    assert doc["openapi"].startswith("3.1")
    doc = _nulls_to_json_schema(doc)
    # the streamed-completion allowance (see the module docstring), kept inside the document so its
    # relative $refs resolve there
    chunk = copy.deepcopy(doc["components"]["schemas"]["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = {"anyOf": [choice["finish_reason"], {"type": "null"}]}
    doc["components"]["schemas"][STREAMED_COMPLETION] = chunk
    return doc


def _describe(error: jsonschema.ValidationError) -> str:
    """The error's path and message, down to the likeliest branch of an ``anyOf``."""
    while error.context:  # the deepest error of a branch that is not the ``type: null`` one
        error = max(error.context, key=lambda e: (e.validator != "type", len(e.absolute_path)))
    return f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"


@pytest.fixture(scope="module")
def validate(openai_doc):
    """``validate(body, component, schema=None)``: raise unless ``body`` matches
    ``#/components/schemas/<component>`` (or ``schema``, whose refs resolve in the document)."""
    registry = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(openai_doc))

    def check(body, component: str | None = None, schema: dict | None = None):
        if schema is None:
            schema = {"$ref": f"{DOC_URI}#/components/schemas/{component}"}
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{component}: {_describe(e)}" for e in errors[:10]) \
            + f"\nbody: {json.dumps(body)[:2000]}"

    return check


@pytest.fixture(scope="module")
def server(serve):
    return serve("--api-key", API_KEY, "--max-model-len", "128", "--num-kv-blocks", "64", "--max-num-seqs", "8",
                 "--served-model-name", MODEL, "--disable-log-requests", "--uvicorn-log-level", "warning")


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def _events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The JSON payloads of an SSE stream (the ``[DONE]`` terminator checked and dropped)."""
    payloads = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[len("data: "):])
    assert payloads and payloads[-1] == "[DONE]"
    return [json.loads(x) for x in payloads[:-1]]


def _schema_at(doc: dict, component: str) -> dict:
    return doc["components"]["schemas"][component]


# ----------------------------------------------------------------- the document itself
RESPONSE_COMPONENTS = ["CreateCompletionResponse", "CreateChatCompletionResponse",
                       "CreateChatCompletionStreamResponse", "ListModelsResponse", "Model", "ErrorResponse", "Error",
                       "CompletionUsage", "ChatCompletionResponseMessage", "ChatCompletionTokenLogprob",
                       "ChatCompletionStreamResponseDelta"]


def test_document_routes_name_the_components_checked_here(openai_doc):
    paths = openai_doc["paths"]

    def ref(path, status="200", media="application/json"):
        return paths[path]["post" if path != "/models" else "get"]["responses"][status]["content"][media]["schema"]["$ref"]

    assert ref("/completions") == "#/components/schemas/CreateCompletionResponse"
    assert ref("/chat/completions") == "#/components/schemas/CreateChatCompletionResponse"
    assert ref("/chat/completions", media="text/event-stream") == "#/components/schemas/CreateChatCompletionStreamResponse"
    assert ref("/models") == "#/components/schemas/ListModelsResponse"
    assert _schema_at(openai_doc, "ErrorResponse")["properties"]["error"]["$ref"] == "#/components/schemas/Error"


def test_no_checked_schema_forbids_extra_fields(openai_doc):
    """vLLM's extras (``stop_reason``, model ``root``/``parent``/``max_model_len``) are only valid while
    these schemas leave additional properties open."""

    def closed(node, seen):
        if isinstance(node, list):
            return any(closed(x, seen) for x in node)
        if not isinstance(node, dict):
            return False
        if node.get("additionalProperties") is False or node.get("unevaluatedProperties") is False:
            return True
        target = node.get("$ref", "")
        if target.startswith("#/components/schemas/") and target not in seen:
            seen.add(target)
            if closed(_schema_at(openai_doc, target.rsplit("/", 1)[1]), seen):
                return True
        return any(closed(v, seen) for k, v in node.items() if k != "$ref")

    assert [c for c in RESPONSE_COMPONENTS if closed(_schema_at(openai_doc, c), set())] == []


def test_nullable_conversion(validate):
    schema = {"type": "object", "properties": {"usage": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}
    validate({"usage": None}, schema=schema)
    converted = _nulls_to_json_schema({"type": "string", "enum": ["stop"], "nullable": True})
    validate(None, schema=converted)
    validate("stop", schema=converted)
    with pytest.raises(AssertionError):
        validate("other", schema=converted)
    # a stream chunk's usage is a nullable $ref in the document
    validate({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
              "usage": None}, "CreateChatCompletionStreamResponse")
    with pytest.raises(AssertionError, match="refusal"):
        validate({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [
            {"index": 0, "delta": {}, "finish_reason": None, "logprobs": {"content": []}}]},
            "CreateChatCompletionStreamResponse")


# ----------------------------------------------------------------- the server's replies
def test_completion_with_n_and_logprobs(client, validate):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Hello there", "The sky"], "n": 2,
                                              "max_tokens": 4, "logprobs": 2, "temperature": 1.0, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateCompletionResponse")
    assert len(body["choices"]) == 4
    assert all(len(c["logprobs"]["tokens"]) >= 1 for c in body["choices"])
    plain = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "echo": True})
    assert plain.status_code == 200, plain.text
    validate(plain.json(), "CreateCompletionResponse")
    assert plain.json()["choices"][0]["logprobs"] is None


def test_chat_with_logprobs(client, validate):
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "n": 2, "temperature": 1.0, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert len(body["choices"]) == 2
    assert all(len(c["logprobs"]["content"]) >= 1 for c in body["choices"])
    plain = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 2})
    assert plain.status_code == 200, plain.text
    validate(plain.json(), "CreateChatCompletionResponse")
    assert plain.json()["choices"][0]["logprobs"] is None


def test_streamed_completion_chunks(client, validate):
    for extra in ({"logprobs": 2}, {"echo": True}):
        chunks = _events(client, "/v1/completions", {
            "model": MODEL, "prompt": ["Once upon", "A"], "n": 2, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, **extra})
        last: dict[int, dict] = {}
        for chunk in chunks:
            validate(chunk, STREAMED_COMPLETION)
            for choice in chunk["choices"]:
                last[choice["index"]] = chunk | {"choices": [choice]}
        assert sorted(last) == [0, 1, 2, 3]
        for chunk in last.values():  # each choice ends with a finish reason: the document's shape exactly
            validate(chunk, "CreateCompletionResponse")
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_streamed_chat_chunks(client, validate):
    chunks = _events(client, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me"}], "n": 2, "max_tokens": 5,
        "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1})
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["index"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]} == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    plain = _events(client, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 3, "stream": True})
    for chunk in plain:
        validate(chunk, "CreateChatCompletionStreamResponse")


def test_models(client, validate):
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    validate(r.json(), "ListModelsResponse")
    assert [m["id"] for m in r.json()["data"]] == [MODEL]


@pytest.mark.parametrize("method, path, kwargs, status", [
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "max_tokens": "many"}}, 422),  # wrong type
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "n": 0}}, 400),  # out of range
    ("post", "/v1/chat/completions", {"json": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}, 404),
    ("post", "/v1/chat/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x"}, "headers": {"Authorization": "Bearer no"}},
     401),
    ("get", "/v1/no-such-route", {}, 404),
    ("get", "/v1/completions", {}, 405),
])
def test_error_bodies(client, validate, method, path, kwargs, status):
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    validate(r.json(), "ErrorResponse")


def test_embeddings(serve, validate):
    """``/v1/embeddings`` (float and base64) against ``CreateEmbeddingResponse``."""
    server = serve("--runner", "pooling", "--max-model-len", "64", "--uvicorn-log-level", "warning")
    import base64

    import numpy as np

    for fmt in ("float", "base64"):
        r = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": ["Hi", "there"], "encoding_format": fmt})
        assert r.status_code == 200, r.text
        body = r.json()
        if fmt == "base64":  # the document types `embedding` as floats only; base64 is the same floats encoded
            for item in body["data"]:
                assert isinstance(item["embedding"], str)
                item["embedding"] = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4").tolist()
        validate(body, "CreateEmbeddingResponse")


def test_tool_calls_and_structured_chat(serve, validate, make_checkpoint, tmp_path):
    """A chat answer with tool calls (and one constrained by a JSON schema) against the document."""
    from pageant.engine.testing import TOOL_CHAT_TEMPLATE

    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_CHAT_TEMPLATE)
    server = serve("--chat-template", str(template), "--uvicorn-log-level", "warning",
                   "--structured-outputs-config", '{"disable_any_whitespace": true}',
                   model=make_checkpoint("llama", max_position_embeddings=2048))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"]}}}]
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "call f"}], "tools": tools, "tool_choice": "required",
        "max_tokens": 60, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"], r.text
    validate(r.json(), "CreateChatCompletionResponse")
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "json"}], "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": tools[0]["function"]["parameters"]}}},
        timeout=60)
    validate(r.json(), "CreateChatCompletionResponse")
