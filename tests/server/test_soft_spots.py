"""Soft spots found by probing a real `pageant serve`: stop-condition caps, header limits (431) and
the header deadline, tokenization off the event loop, and admission with --max-queued-requests.

Every client loop is bounded in count and time, and everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest

PROMPT = "The assert statement is"
HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server(serve):
    """Default limits, except a short header deadline; 64 sequences at once and no queue beyond them."""
    return serve("--max-model-len", "256", "--num-kv-blocks", "256", "--max-num-seqs", "64",
                 "--max-queued-requests", "0", "--request-header-timeout", str(HEADER_TIMEOUT),
                 "--uvicorn-log-level", "warning")


@pytest.fixture(scope="module")
def small_server(serve):
    """Four sequences at once and eight queued; small stop and header limits set by flag."""
    return serve("--max-model-len", "256", "--num-kv-blocks", "128", "--max-num-seqs", "4",
                 "--max-queued-requests", "8", "--max-stop-strings", "2", "--max-stop-chars", "10",
                 "--max-stop-token-ids", "1", "--h11-max-header-count", "30",
                 "--h11-max-incomplete-event-size", "2048", "--uvicorn-log-level", "warning")


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# ---------------------------------------------------------------------------- stop conditions
@pytest.mark.parametrize("extra, param, words", [
    ({"stop": ["x" * 1024] * 1000}, "stop", "at most 64 stop strings"),
    ({"stop": [f"s{i}" for i in range(65)]}, "stop", "--max-stop-strings"),
    ({"stop": ["y" * 1024] * 5}, "stop", "at most 4096 characters"),
    ({"stop_token_ids": list(range(257))}, "stop_token_ids", "at most 256 stop token ids"),
])
def test_too_many_or_too_long_stop_conditions_are_400(server, extra, param, words):
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = {"max_tokens": 4, **extra}
        body.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})
        r = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
        assert r.status_code == 400, r.text
        err = _error(r)
        assert err["param"] == param and words in err["message"] and err["type"] == "BadRequestError"


def test_stop_limits_within_the_defaults_still_stop(server):
    client = _client(server)
    model = client.models.list().data[0].id
    text = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(text) >= 4
    stop = text[2:4]  # likely spans a token boundary; the earliest occurrence is where the text is cut
    stops = [f"never-{i}-" + "z" * 50 for i in range(63)] + [stop]  # 64 strings, about 3800 characters
    assert sum(map(len, stops)) <= 4096
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stop=stops,
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, stop=stops + ["one-more"])
    assert refused.value.code == "too_many_stop_strings"


def test_stop_limits_are_set_by_flag(small_server):
    url = f"{small_server.base_url}/v1/completions"
    cases = [({"stop": ["a", "b", "c"]}, "stop", "at most 2 stop strings"),
             ({"stop": ["abcdef", "ghijk"]}, "stop", "at most 10 characters"),
             ({"stop_token_ids": [1, 2]}, "stop_token_ids", "at most 1 stop token ids")]
    for extra, param, words in cases:
        r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2, **extra}, timeout=30)
        assert r.status_code == 400 and _error(r)["param"] == param and words in _error(r)["message"], r.text
    ok = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2, "stop": ["ab", "cdefghij"], "stop_token_ids": [5]},
                    timeout=30)
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------- headers
def _raw_exchange(port: int, payload: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``payload`` on a fresh connection and read until the server closes (or ``timeout``)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        data = b""
        while time.monotonic() - start < timeout:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - start


def _json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_large_or_many_headers_get_431(server):
    url = f"{server.base_url}/health"
    assert httpx.get(url, headers={"x-fine": "a" * 4000}, timeout=10).status_code == 200
    big = httpx.get(url, headers={"x-big": "a" * 65536}, timeout=10)
    assert big.status_code == 431 and _error(big)["code"] == "request_header_fields_too_large"
    assert "16384" in _error(big)["message"]
    many = httpx.get(url, headers=[(f"x-h{i}", "v") for i in range(1000)], timeout=10)
    assert many.status_code == 431 and "at most 100" in _error(many)["message"]
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    raw, _ = _raw_exchange(server.port, head + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)) + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 431 ") and _json_body(raw)["error"]["code"] == "request_header_fields_too_large"
    # an incomplete header block over the limit: h11's own refusal, answered as a JSON 431 too
    raw, _ = _raw_exchange(server.port, head + b"X-Big: " + b"b" * 40_000)
    assert raw.startswith(b"HTTP/1.1 431 ") and _json_body(raw)["error"]["code"] == "request_header_fields_too_large"
    # normal requests are unaffected, on new and on kept-alive connections
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            assert client.get(url, headers={"x-a": "1", "user-agent": "test"}).status_code == 200
        r = client.post(f"{server.base_url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200
    assert server.metric("vllm:request_failure_total", {"reason": "too_large"}) >= 2


def test_header_limits_are_set_by_flag(small_server):
    url = f"{small_server.base_url}/health"
    assert httpx.get(url, headers=[(f"x-h{i}", "v") for i in range(20)], timeout=10).status_code == 200
    assert httpx.get(url, headers=[(f"x-h{i}", "v") for i in range(40)], timeout=10).status_code == 431
    assert httpx.get(url, headers={"x-big": "a" * 3000}, timeout=10).status_code == 431


def test_half_open_connections_are_closed_after_the_header_timeout(server):
    socks = []
    try:
        start = time.monotonic()
        for i in range(10):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT + 8)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow-%d: " % i)  # and never more
            socks.append(sock)
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT + 8)  # sends nothing
        socks.append(idle)
        # meanwhile the server serves others
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200
        for sock in socks:
            data = b""
            while time.monotonic() - start < HEADER_TIMEOUT + 8:
                chunk = sock.recv(65536)  # the socket timeout bounds each wait
                if not chunk:
                    break
                data += chunk
            else:
                pytest.fail("the server kept a half-open connection open")
            if sock is idle:
                assert data == b""
            else:
                assert data.startswith(b"HTTP/1.1 408 ") and _json_body(data)["error"]["code"] == "request_header_timeout"
        elapsed = time.monotonic() - start
        assert HEADER_TIMEOUT - 0.5 <= elapsed < HEADER_TIMEOUT + 6
    finally:
        for sock in socks:
            sock.close()


def test_a_slow_body_after_a_complete_header_is_not_cut(server):
    """The deadline covers the header only: a request whose body comes later is served."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        time.sleep(HEADER_TIMEOUT + 1)
        sock.sendall(body)
        data = b""
        start = time.monotonic()
        while time.monotonic() - start < 30:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]


# ---------------------------------------------------------------------------- tokenizing off the loop
def _probe_health_while(server, work) -> tuple[list[float], object]:
    """Run ``work()`` on a thread and probe /health every 50 ms until it ends (at most 60 s)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(value=work()))
    latencies = []
    with httpx.Client(timeout=10) as client:
        thread.start()
        deadline = time.monotonic() + 60
        while thread.is_alive() and time.monotonic() < deadline and len(latencies) < 1000:
            start = time.monotonic()
            assert client.get(f"{server.base_url}/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.05)
    thread.join(60)
    return latencies, result.get("value")


def test_health_stays_fast_while_a_megabyte_prompt_is_tokenized(server):
    text = "The quick brown fox jumps over the lazy dog, again and again. " * 17_000  # about 1 MB
    payload = json.dumps({"prompt": text, "max_tokens": 4}).encode()  # encoded here, not on the probing thread

    def big_completion():
        return httpx.post(f"{server.base_url}/v1/completions", content=payload,
                          headers={"content-type": "application/json"}, timeout=60)

    latencies, response = _probe_health_while(server, big_completion)
    assert response.status_code == 400 and _error(response)["code"] == "context_length_exceeded"
    assert latencies and max(latencies) < 0.5, sorted(latencies)[-5:]

    tokenize = json.dumps({"prompt": text}).encode()

    def big_tokenize():
        return httpx.post(f"{server.base_url}/tokenize", content=tokenize,
                          headers={"content-type": "application/json"}, timeout=60)

    latencies, response = _probe_health_while(server, big_tokenize)
    assert response.status_code == 200 and response.json()["count"] > 100_000
    assert latencies and max(latencies) < 0.5, sorted(latencies)[-5:]


def test_multi_megabyte_prompt_is_refused_before_tokenizing(server):
    start = time.monotonic()
    r = httpx.post(f"{server.base_url}/v1/completions", timeout=30,
                   content=json.dumps({"prompt": "word " * (1024 * 1024)}).encode(),  # 5 MiB > the 4 MiB default
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    assert time.monotonic() - start < 5


# ---------------------------------------------------------------------------- admission
async def _burst(url: str, bodies: list[dict], stream: bool) -> list[int]:
    """Send all ``bodies`` at once; the status of each (streams are closed, i.e. aborted, after)."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        if not stream:
            responses = await asyncio.wait_for(asyncio.gather(*(client.post(url, json=b) for b in bodies)), 120)
            return [r.status_code for r in responses]
        requests = [client.build_request("POST", url, json={**b, "stream": True}) for b in bodies]
        responses = await asyncio.wait_for(asyncio.gather(*(client.send(r, stream=True) for r in requests)), 60)
        try:
            return [r.status_code for r in responses]
        finally:
            for r in responses:
                await r.aclose()


def test_a_burst_on_an_idle_engine_is_admitted_up_to_its_sequences(server):
    """max_num_seqs 64 and --max-queued-requests 0: 64 requests at once all run, none is refused."""
    bodies = [{"prompt": f"{PROMPT} {i}", "max_tokens": 4} for i in range(64)]
    statuses = asyncio.run(_burst(f"{server.base_url}/v1/completions", bodies, stream=False))
    assert statuses == [200] * 64


def test_only_requests_beyond_the_running_ones_count_as_queued(small_server):
    """max_num_seqs 4 and --max-queued-requests 8: of 20 long requests at once, 12 are admitted."""
    bodies = [{"prompt": PROMPT, "max_tokens": 230, "ignore_eos": True} for _ in range(20)]
    statuses = asyncio.run(_burst(f"{small_server.base_url}/v1/completions", bodies, stream=True))
    assert sorted(statuses) == [200] * 12 + [429] * 8, statuses
    # once they are gone (closed streams abort), the engine takes requests again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and small_server.metric("vllm:num_requests_running") > 0:
        time.sleep(0.1)
    assert httpx.post(f"{small_server.base_url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                      timeout=30).status_code == 200
