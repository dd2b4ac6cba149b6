"""The OpenAI-compatible API of a real `pageant serve` subprocess, driven by the real `openai` client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

API_KEY = "test-key-123"  # the same as conftest.API_KEY (test files cannot import each other)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The assert statement is"
CHAT = [{"role": "user", "content": "Tell me about the assert statement."}]


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.text if hasattr(choice, "text") else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


# ---------------------------------------------------------------------------- happy paths
def test_models_and_version(client, api_server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    version = httpx.get(f"{api_server.base_url}/version", headers=AUTH).json()["version"]
    from pageant import __version__

    assert version == __version__


def test_greedy_completion_equals_offline_engine(client, tiny_checkpoint):
    """The server's greedy text and tokens are exactly what the engine produces offline."""
    from pageant.engine import LLM, SamplingParams

    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    llm = LLM(model=str(tiny_checkpoint), max_model_len=256, num_kv_blocks=64)
    ref = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20))[0]
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_completion(client):
    resp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1 and resp.usage.prompt_tokens > 5
    tok = httpx.post(f"{client.base_url.scheme}://{client.base_url.host}:{client.base_url.port}/tokenize",
                     headers=AUTH, json={"messages": CHAT}).json()
    assert tok["count"] == resp.usage.prompt_tokens


def test_max_completion_tokens(client):
    resp = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_text_equals_non_streamed(client, kind):
    kwargs = dict(model="tiny", max_tokens=24, temperature=0, n=2, extra_body={"ignore_eos": True})
    if kind == "completions":
        full = client.completions.create(prompt=PROMPT, **kwargs)
        stream = client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kwargs)
        expected = {c.index: c.text for c in full.choices}
    else:
        full = client.chat.completions.create(messages=CHAT, **kwargs)
        stream = client.chat.completions.create(messages=CHAT, stream=True, stream_options={"include_usage": True},
                                                **kwargs)
        expected = {c.index: c.message.content for c in full.choices}
    texts, reasons, usage = _stream_text(stream)
    assert texts == expected
    assert reasons == {0: "length", 1: "length"}
    assert usage is not None and usage.model_dump() == full.usage.model_dump()


def test_n_choices_and_usage(client):
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7,
                                     extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 3 * 8  # usage counts every choice's tokens
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 24


def test_batch_of_prompts(client):
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
              for p in (PROMPT, "Lists are")]
    batch = client.completions.create(model="tiny", prompt=[PROMPT, "Lists are"], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == single


def test_token_id_prompt(client, api_server):
    ids = httpx.post(f"{api_server.base_url}/tokenize", headers=AUTH, json={"prompt": PROMPT}).json()["tokens"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    text = httpx.post(f"{api_server.base_url}/detokenize", headers=AUTH, json={"tokens": ids}).json()["prompt"]
    assert PROMPT in text


def test_stop_string(client):
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[8:11]
    cut = greedy.find(stop)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == greedy[:cut]
    assert resp.choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    def sample(seed):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_logprobs(client):
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and chosen <= 0
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy picks the most likely token
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)


def test_penalties_logit_bias_and_user_accepted(client, api_server):
    ids = httpx.post(f"{api_server.base_url}/tokenize", headers=AUTH,
                     json={"prompt": " the", "add_special_tokens": False}).json()["tokens"]
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, user="someone",
                                     presence_penalty=0.5, frequency_penalty=0.5,
                                     logit_bias={str(ids[0]): 100}, extra_body={"ignore_eos": True})
    forced = httpx.post(f"{api_server.base_url}/detokenize", headers=AUTH, json={"tokens": ids[:1] * 6}).json()["prompt"]
    assert resp.choices[0].text == forced


# ---------------------------------------------------------------------------- auth
def test_api_key_required(api_server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{api_server.base_url}/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "AuthenticationError"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="nope", max_retries=0).models.list()
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{api_server.base_url}{path}").status_code == 200


# ---------------------------------------------------------------------------- bad input
def _long_prompt(n_words: int) -> str:
    return " ".join(["statement"] * n_words)


BAD_REQUESTS = [
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404),
    ("wrong type", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 422),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 422),
    ("n over cap", "/v1/completions", {"prompt": "x", "n": 1000}, 400),
    ("logprobs over cap", "/v1/completions", {"prompt": "x", "logprobs": 21}, 400),
    ("top_logprobs over cap", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400),
    ("max_tokens over cap", "/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400),
    ("max_tokens zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    ("negative temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    ("top_p zero", "/v1/completions", {"prompt": "x", "top_p": 0}, 400),
    ("logit_bias range", "/v1/completions", {"prompt": "x", "logit_bias": {"5": 1000}}, 400),
    ("logit_bias key", "/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400),
    ("token out of vocab", "/v1/completions", {"prompt": [1, 10**7]}, 400),
    ("prompt over context", "/v1/completions", {"prompt": _long_prompt(400), "max_tokens": 4}, 400),
    ("prompt + max_tokens over context", "/v1/completions", {"prompt": _long_prompt(200), "max_tokens": 200}, 400),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 422),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422),
    ("image part", "/v1/chat/completions",  # a text-only model: 400 (pageant.engine.multimodal)
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ("stream_options without stream", "/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400),
    ("tokenize nothing", "/tokenize", {}, 400),
    ("detokenize out of vocab", "/detokenize", {"tokens": [-1]}, 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(api_server, name, path, body, status):
    r = httpx.post(f"{api_server.base_url}{path}", headers=AUTH, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_context_length_error_code(api_server):
    r = httpx.post(f"{api_server.base_url}/v1/completions", headers=AUTH,
                   json={"prompt": _long_prompt(200), "max_tokens": 200})
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
                                 b'{"prompt": "x", "logit_bias": {"3": -Infinity}}'])
def test_non_finite_numbers_rejected(api_server, raw):
    r = httpx.post(f"{api_server.base_url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=raw)
    assert r.status_code == 400, r.text
    assert "finite" in r.json()["error"]["message"]


def test_malformed_json_and_oversized_body(api_server):
    r = httpx.post(f"{api_server.base_url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=b'{"prompt": ')
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    big = json.dumps({"prompt": "a" * (5 * 1024 * 1024)}).encode()
    r = httpx.post(f"{api_server.base_url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit still applies
        for _ in range(6):
            yield b" " * (1024 * 1024)

    r = httpx.post(f"{api_server.base_url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunked())
    assert r.status_code == 413


def test_server_still_serves_after_bad_input(client, api_server):
    assert httpx.get(f"{api_server.base_url}/health").status_code == 200
    assert client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2).choices[0].finish_reason


# ---------------------------------------------------------------------------- metrics
METRIC_NAMES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:cache_config_info",
    "vllm:lora_requests_info", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:request_success_total", "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket", "vllm:request_failure_total",
]


def test_metrics(client, api_server):
    before_ok = api_server.metric("vllm:request_success_total", {"model_name": "tiny"})
    before_gen = api_server.metric("vllm:generation_tokens_total")
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    httpx.post(f"{api_server.base_url}/v1/completions", headers=AUTH, json={"prompt": "x", "n": 1000})
    text = httpx.get(f"{api_server.base_url}/metrics").text
    for name in METRIC_NAMES:
        assert f"\n{name}{{" in text, name
        line = next(line for line in text.splitlines() if line.startswith(name + "{"))
        assert 'model_name="tiny"' in line, line
    assert api_server.metric("vllm:request_success_total", {"finished_reason": "length"}) >= 1
    assert api_server.metric("vllm:request_success_total", {"model_name": "tiny"}) == before_ok + 1
    assert api_server.metric("vllm:generation_tokens_total") >= before_gen + 5
    assert api_server.metric("vllm:request_failure_total", {"reason": "bad_request"}) >= 1
    assert api_server.metric("vllm:e2e_request_latency_seconds_count") >= 1
    assert api_server.metric("vllm:inter_token_latency_seconds_count") >= 4
    assert api_server.metric("vllm:cache_config_info", {"block_size": "16", "num_gpu_blocks": "64"}) == 1
    assert api_server.metric("vllm:kv_cache_usage_perc") == 0


# ---------------------------------------------------------------------------- disconnects
def _wait_idle(server, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (server.metric("vllm:num_requests_running") == 0 and server.metric("vllm:num_requests_waiting") == 0
                and server.metric("pageant:num_free_kv_blocks") == server.metric("pageant:num_kv_blocks")):
            return True
        time.sleep(0.05)
    return False


LONG = {"model": "tiny", "prompt": PROMPT, "max_tokens": 240, "n": 8, "temperature": 1.0, "ignore_eos": True}


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_blocks(api_server, stream):
    assert _wait_idle(api_server)
    total = api_server.metric("pageant:num_kv_blocks")
    aborts = api_server.metric("vllm:request_failure_total", {"reason": "abort"})
    successes = api_server.metric("vllm:request_success_total")
    if stream:
        with httpx.stream("POST", f"{api_server.base_url}/v1/completions", headers=AUTH,
                          json={**LONG, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the request is running: hang up mid-generation
        # while it ran, it held blocks
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{api_server.base_url}/v1/completions", headers=AUTH, json=LONG, timeout=0.5)
    assert _wait_idle(api_server), "the abandoned request kept running or kept its KV blocks"
    assert api_server.metric("pageant:num_free_kv_blocks") == total
    assert api_server.metric("vllm:request_failure_total", {"reason": "abort"}) == aborts + 1
    assert api_server.metric("vllm:request_success_total") == successes


def test_echo_streamed_and_not(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    full = client.completions.create(**kwargs).choices[0].text
    texts, _, _ = _stream_text(client.completions.create(stream=True, **kwargs))
    assert full.startswith(PROMPT) and texts == {0: full}
