"""Failures inside the engine, in-process through the app factory ``build_app(engine, config)``.

The engines are real ``LLMEngine``s on the tiny checkpoint; the subclasses below only add a switch
that makes the model forward raise (so ``LLMEngine.step`` goes through its real failure path and
raises ``EngineStepError``) or that blocks the step (a wedged loop).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from pageant.engine import LLMEngine
from pageant.engine.server.app import ServerConfig, build_app

BODY = {"prompt": "The assert statement is", "max_tokens": 8, "temperature": 0}


class FailingEngine(LLMEngine):
    """Raises inside the model forward while ``fail`` is set."""

    def __init__(self, config):
        super().__init__(config)
        self.fail = threading.Event()
        real_execute = self.runner.execute

        def execute(*args, **kwargs):
            if self.fail.is_set():
                raise RuntimeError("injected model failure")
            return real_execute(*args, **kwargs)

        self.runner.execute = execute


class WedgedEngine(LLMEngine):
    """``step`` blocks on ``release`` while ``wedge`` is set."""

    def __init__(self, config):
        super().__init__(config)
        self.wedge = threading.Event()
        self.release = threading.Event()
        self.in_step = threading.Event()

    def step(self):
        if self.wedge.is_set():
            self.in_step.set()
            self.release.wait(30)
        return super().step()


def _metric(client, name, labels):
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _engine(cls, checkpoint):
    return cls.from_kwargs(model=str(checkpoint), max_model_len=128, num_kv_blocks=32)


def test_model_step_failure_fails_requests_and_health(tiny_checkpoint):
    engine = _engine(FailingEngine, tiny_checkpoint)
    with TestClient(build_app(engine, ServerConfig(log_requests=False))) as client:
        assert client.post("/v1/completions", json=BODY).status_code == 200
        assert client.get("/health").status_code == 200
        engine.fail.set()
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "engine_error" and "injected model failure" in r.json()["error"]["message"]
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        payloads = [json.loads(e) for e in events if e != "[DONE]"]
        assert any("error" in p for p in payloads), events
        assert not any(c.get("finish_reason") for p in payloads for c in p.get("choices", ()))  # no normal stop
        health = client.get("/health")
        assert health.status_code == 503 and "injected model failure" in health.json()["detail"]
        assert client.get("/ready").status_code == 503
        assert _metric(client, "vllm:request_failure_total", {"reason": "engine_error"}) == 2
        # the engine freed the failed requests and keeps serving
        engine.fail.clear()
        assert client.post("/v1/completions", json=BODY).status_code == 200
        assert _metric(client, "pageant:num_free_kv_blocks", {}) == _metric(client, "pageant:num_kv_blocks", {})


def test_wedged_loop_turns_health_503_while_metrics_stay_fast(tiny_checkpoint):
    engine = _engine(WedgedEngine, tiny_checkpoint)
    config = ServerConfig(log_requests=False, engine_stall_timeout=0.5)
    with TestClient(build_app(engine, config)) as client:
        assert client.get("/health").status_code == 200
        engine.wedge.set()
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(r=client.post("/v1/completions", json=BODY)))
        worker.start()
        assert engine.in_step.wait(10)
        time.sleep(0.8)
        start = time.monotonic()
        health = client.get("/health")
        metrics = client.get("/metrics")
        assert time.monotonic() - start < 1.0  # served by the event loop while the engine thread is stuck
        assert health.status_code == 503 and "no progress" in health.json()["detail"]
        assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
        engine.wedge.clear()
        engine.release.set()
        worker.join(30)
        assert result["r"].status_code == 200
        deadline = time.monotonic() + 5
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("n_prompts", [1, 3])
def test_engine_rejection_is_a_400_and_nothing_leaks(tiny_checkpoint, n_prompts):
    """A request the engine itself refuses (here: more KV blocks than the whole pool) is a 400."""
    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=128, num_kv_blocks=2)
    with TestClient(build_app(engine, ServerConfig(log_requests=False))) as client:
        prompts = ["Short one"] * (n_prompts - 1) + ["The assert statement is"]
        r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 64})
        assert r.status_code == 400 and "blocks" in r.json()["error"]["message"]
        assert _metric(client, "pageant:num_free_kv_blocks", {}) == 2
        assert client.app.state.async_engine.num_inflight == 0
        ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert ok.status_code == 200
