"""Backpressure (429 before tokenizing) and SIGTERM draining, on real `pageant serve` subprocesses."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

PROMPT = "The assert statement is"


def _wait_for(predicate, timeout=20.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _events(lines):
    """Parsed SSE data payloads (dicts, or the string "[DONE]")."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def _finish(events) -> tuple[str, str | None, bool]:
    text, reason, done = "", None, False
    for event in events:
        if event == "[DONE]":
            done = True
            continue
        assert "error" not in event, event
        for choice in event["choices"]:
            text += choice["text"]
            reason = choice["finish_reason"] or reason
    return text, reason, done


@pytest.fixture(scope="module")
def tight_server(serve):
    """One running sequence at a time, at most one waiting request."""
    return serve("--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "1",
                 "--max-queued-requests", "1", "--disable-log-requests", "--uvicorn-log-level", "warning")


def test_backpressure_429_without_hurting_running_requests(tight_server):
    url = f"{tight_server.base_url}/v1/completions"
    long_body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", url, json={**long_body, "stream": True}, timeout=60) as running:
        lines = running.iter_lines()
        first = next(e for e in _events(lines))  # the first request is running now
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.update(r=httpx.post(url, json={**long_body, "max_tokens": 5},
                                                                             timeout=60)))
        waiter.start()
        assert _wait_for(lambda: tight_server.metric("vllm:num_requests_waiting") == 1)
        # Queue full: 429 at once. The prompt is far over the context, so a 429 (not a 400) shows the
        # capacity check comes before tokenizing.
        start = time.monotonic()
        rejected = httpx.post(url, json={"prompt": "word " * 5000, "max_tokens": 4}, timeout=10)
        assert rejected.status_code == 429, rejected.text
        assert time.monotonic() - start < 2.0
        assert rejected.headers["retry-after"] == "1"
        assert rejected.json()["error"]["code"] == "queue_full"
        chat = httpx.post(f"{tight_server.base_url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert chat.status_code == 429
        text, reason, done = _finish([first, *_events(lines)])
    assert reason == "length" and done  # the running request finished normally
    waiter.join(60)
    assert queued["r"].status_code == 200 and queued["r"].json()["choices"][0]["finish_reason"] == "length"
    assert tight_server.metric("vllm:request_failure_total", {"reason": "queue_full"}) == 2
    assert httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2}, timeout=30).status_code == 200


def test_sigterm_drains_in_flight_requests_then_exits_0(serve):
    server = serve("--max-model-len", "256", "--num-kv-blocks", "64", "--shutdown-timeout", "60",
                   "--uvicorn-log-level", "warning")
    url = f"{server.base_url}/v1/completions"
    with httpx.stream("POST", url, json={"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "temperature": 0,
                                         "stream": True}, timeout=60) as running:
        lines = running.iter_lines()
        first = next(e for e in _events(lines))
        server.proc.send_signal(signal.SIGTERM)
        assert _wait_for(lambda: httpx.get(f"{server.base_url}/ready", timeout=5).status_code == 503, timeout=5)
        refused = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200  # alive, just draining
        text, reason, done = _finish([first, *_events(lines)])
    assert reason == "length" and done
    assert server.proc.wait(30) == 0, server.output()


def test_sigterm_fails_what_outlives_the_shutdown_timeout(serve):
    server = serve("--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "1", "--shutdown-timeout", "1",
                   "--uvicorn-log-level", "warning")
    body = {"prompt": PROMPT, "max_tokens": 240, "n": 8, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as running:
        lines = running.iter_lines()
        next(e for e in _events(lines))
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        events = list(_events(lines))
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert errors and errors[0]["error"]["code"] == "server_shutting_down"
    assert not any(c.get("finish_reason") == "stop" for e in events if isinstance(e, dict) for c in e.get("choices", []))
    assert server.proc.wait(30) == 0, server.output()
    assert time.monotonic() - start < 15
