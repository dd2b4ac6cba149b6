"""Prometheus metrics with vLLM's names (the Gateway API Inference Extension's model-server protocol).

One ``CollectorRegistry`` per app (never the global one). Gauges and the engine's cumulative
counters are read from the latest ``engine.stats()`` snapshot when Prometheus scrapes; per-request
counters and histograms are recorded by the engine thread as requests progress and finish. Token
timings come from the engine's clock (``RequestMetrics``: a request's first and latest token times),
as vLLM's come from the engine core's: TTFT is first token - arrival, ITL the gap between the
latest-token times of consecutive steps that gave a request tokens.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pageant.engine.outputs import RequestMetrics, RequestOutput

disable_created_metrics()  # no `*_created` series (as vLLM): they double every counter's cardinality
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    """Exposes the engine's gauges and cumulative counters from the latest stats snapshot."""

    def __init__(self, model_name: str, get_stats: Callable[[], dict], get_lora_info: Callable[[], dict],
                 cache_config: dict[str, str]):
        self.model_name = model_name
        self.get_stats = get_stats
        self.get_lora_info = get_lora_info
        self.cache_config = cache_config

    def collect(self):
        stats = self.get_stats() or {}
        labels = ["model_name"]
        values = [self.model_name]

        def gauge(name: str, doc: str, value) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, float(value or 0))
            return g

        def counter(name: str, doc: str, value) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, float(value or 0))
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    stats.get("num_requests_running"))
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    stats.get("num_requests_waiting"))
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    stats.get("kv_cache_usage"))
        yield gauge("pageant:num_kv_blocks", "KV-cache blocks in the pool.", stats.get("num_kv_blocks"))
        yield gauge("pageant:num_free_kv_blocks", "KV-cache blocks not held by any request.",
                    stats.get("num_free_kv_blocks"))
        # vLLM's CacheConfig fields as labels; cache_dtype as configured ("auto", "fp8", "fp8_e4m3")
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache configuration.",
                                 labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching",
                                         "cache_dtype"])
        cfg = self.cache_config
        info.add_metric([self.model_name, str(cfg.get("block_size", stats.get("block_size", ""))),
                         str(cfg.get("num_gpu_blocks", stats.get("num_kv_blocks", ""))),
                         str(cfg.get("enable_prefix_caching", False)), str(cfg.get("cache_dtype", "auto"))], 1.0)
        yield info
        lora = self.get_lora_info()
        lora_info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                                      labels=["model_name", "max_lora", "running_lora_adapters",
                                              "waiting_lora_adapters"])
        lora_info.add_metric([self.model_name, str(lora.get("max_lora", 0)), ",".join(lora.get("running", ())),
                              ",".join(lora.get("waiting", ()))], time.time())
        yield lora_info
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.get("prompt_tokens_total"))
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      stats.get("generation_tokens_total"))
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions from the engine.",
                      stats.get("num_preemptions"))
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                      stats.get("prefix_cache_queries"))
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                      stats.get("prefix_cache_hits"))
        if "spec_decode_num_drafts" in stats:  # speculative decoding is on (vLLM's spec-decode counters)
            yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.",
                          stats["spec_decode_num_drafts"])
            yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
                          stats["spec_decode_num_draft_tokens"])
            yield counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                          stats["spec_decode_num_accepted_tokens"])
            per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted tokens per draft position.", labels=["model_name", "position"])
            for pos, n in enumerate(stats.get("spec_decode_num_accepted_tokens_per_pos", ())):
                per_pos.add_metric([self.model_name, str(pos)], float(n))
            yield per_pos


class ServerMetrics:
    """All metrics of one server. Thread-safe (prometheus_client objects are)."""

    def __init__(self, model_name: str, get_stats: Callable[[], dict],
                 get_lora_info: Callable[[], dict] | None = None, cache_config: dict[str, str] | None = None):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(model_name, get_stats, get_lora_info or (lambda: {}),
                                                     cache_config or {}))
        reg = self.registry
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       ["model_name", "finished_reason"], registry=reg)
        self.request_failure = Counter("vllm:request_failure",
                                       "Requests that failed: rejected (4xx), errored (5xx) or aborted.",
                                       ["model_name", "reason"], registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              ["model_name"], buckets=_TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ["model_name"], buckets=_ITL_BUCKETS, registry=reg)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds (deprecated name of ITL).",
                              ["model_name"], buckets=_ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                             ["model_name"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in the WAITING phase for a request.",
                                    ["model_name"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in the PREFILL phase for a request.",
                                      ["model_name"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.decode_time = Histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in the DECODE phase for a request.",
                                     ["model_name"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                    ["model_name"], buckets=_token_buckets(), registry=reg)
        self.generation_len = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                        ["model_name"], buckets=_token_buckets(), registry=reg)
        # the children of the per-token histograms (labels() is a locked dict look-up per call)
        self._ttft, self._itl, self._tpot = (h.labels(model_name) for h in (self.ttft, self.itl, self.tpot))
        # request_id -> the time of its latest token seen; engine thread only.
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ engine thread
    def _observe_tokens(self, request_id: str, m: RequestMetrics, now: float) -> None:
        """TTFT at a request's first token, then one ITL (and TPOT) per step that gave it tokens."""
        latest = m.last_token_time
        if latest is None:
            return
        prev = self._last.get(request_id)
        if prev is None:
            self._ttft.observe(max(0.0, (m.first_token_time or now) - m.arrival_time))
        elif latest != prev:
            gap = max(0.0, latest - prev)
            self._itl.observe(gap)
            self._tpot.observe(gap)
        else:
            return
        self._last[request_id] = latest

    def observe_output(self, out: RequestOutput, now: float | None = None) -> None:
        """Record token timings of one step's output for a request (called once per output), and its
        end when it is finished."""
        now = time.time() if now is None else now
        with self._lock:
            self._observe_tokens(out.request_id, out.metrics, now)
            if out.finished:
                self._last.pop(out.request_id, None)
        if out.finished:
            self._observe_finished(out, now)

    def observe_requests(self, requests: Iterable[tuple[str, Any]], now: float | None = None) -> None:
        """Token timings of unfinished requests that get no output per step (FINAL_ONLY), from the
        engine's own requests (``(request_id, request)`` pairs; ``request.metrics`` is read)."""
        now = time.time() if now is None else now
        with self._lock:
            for request_id, request in requests:
                self._observe_tokens(request_id, request.metrics, now)

    def _observe_finished(self, out: RequestOutput, now: float) -> None:
        m = out.metrics
        reasons = [c.finish_reason for c in out.outputs]
        if "abort" in reasons:
            return  # counted by the server as a failure (reason "abort") when it aborts the request
        reason = "length" if "length" in reasons else "stop"
        self.request_success.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(max(0.0, (m.finished_time or now) - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.queue_time.labels(self.model_name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
            if m.first_token_time is not None:
                self.prefill_time.labels(self.model_name).observe(max(0.0, m.first_token_time - m.first_scheduled_time))
                self.decode_time.labels(self.model_name).observe(max(0.0, (m.finished_time or now) - m.first_token_time))
        self.prompt_len.labels(self.model_name).observe(len(out.prompt_token_ids))
        self.generation_len.labels(self.model_name).observe(sum(len(c.token_ids) for c in out.outputs))

    def observe_embedding(self, out, now: float | None = None) -> None:
        """A finished embedding request: a success, its latency and prompt length (no tokens generated)."""
        now = time.time() if now is None else now
        m = out.metrics
        self.request_success.labels(self.model_name, "stop").inc()
        self.e2e.labels(self.model_name).observe(max(0.0, (m.finished_time or now) - m.arrival_time))
        if m.first_scheduled_time is not None:
            self.queue_time.labels(self.model_name).observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        self.prompt_len.labels(self.model_name).observe(len(out.prompt_token_ids))

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._last.pop(request_id, None)

    # ------------------------------------------------------------------ event loop
    def failure(self, reason: str) -> None:
        self.request_failure.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _token_buckets() -> tuple[float, ...]:
    buckets = []
    for exp in range(0, 6):
        for mantissa in (1, 2, 5):
            buckets.append(float(mantissa * 10**exp))
    return tuple(buckets)
