"""Prefix caching seen through the server: hit/query counters, the cache-config label, the reset endpoint."""

from __future__ import annotations

from fastapi.testclient import TestClient

from pageant.engine import LLMEngine
from pageant.engine.server.app import ServerConfig, build_app

PROMPT = " ".join(["The assert statement is a convenient way to insert debugging assertions."] * 6)


def _metric(client, name, labels=None):
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()))


def test_prefix_cache_metrics_and_reset(tiny_checkpoint):
    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=256, num_kv_blocks=64,
                                   enable_prefix_caching=True)
    with TestClient(build_app(engine, ServerConfig(log_requests=False))) as client:
        assert _metric(client, "vllm:cache_config_info", {"enable_prefix_caching": "True", "block_size": "16"}) == 1
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        first = client.post("/v1/completions", json=body).json()
        queries = _metric(client, "vllm:prefix_cache_queries_total")
        hits = _metric(client, "vllm:prefix_cache_hits_total")
        assert queries > 0
        second = client.post("/v1/completions", json=body).json()
        assert second["choices"][0]["text"] == first["choices"][0]["text"]  # cached prefix, same greedy output
        assert _metric(client, "vllm:prefix_cache_hits_total") >= hits + 32  # at least two full blocks reused
        assert _metric(client, "vllm:prefix_cache_queries_total") > queries
        assert client.post("/reset_prefix_cache").status_code == 200
        hits = _metric(client, "vllm:prefix_cache_hits_total")
        third = client.post("/v1/completions", json=body).json()
        assert third["choices"][0]["text"] == first["choices"][0]["text"]
        assert _metric(client, "vllm:prefix_cache_hits_total") == hits  # nothing left to hit after the reset
