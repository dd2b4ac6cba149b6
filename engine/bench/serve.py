"""``pageant bench serve``: load an OpenAI-compatible server the way ``vllm bench serve`` does.

Requests are sent with streaming on, so time to first token (TTFT), time per output token (TPOT),
inter-token latency (ITL) and end-to-end latency (E2E) are measured at the client. Arrivals follow a
Poisson process (``burstiness`` 1) or a gamma process (other burstiness), or all at once (rate inf).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

from pageant.engine.bench.datasets import BenchRequest


@dataclass
class RequestResult:
    """What the client saw of one request; times are seconds since the benchmark started."""

    prompt_len: int
    output_len_requested: int
    success: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # absolute, since benchmark start
    text: str = ""  # the completion's text (the chunks' text joined, when streamed)


def arrival_intervals(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds to wait before each of the ``n`` requests: 0 for all at ``rate`` inf, otherwise gamma
    distributed with shape ``burstiness`` and mean ``1 / rate`` (Poisson arrivals at burstiness 1)."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    if rate == float("inf"):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)
    return [0.0] + [rng.gammavariate(burstiness, theta) for _ in range(n - 1)]


async def _arrivals(n: int, rate: float, burstiness: float, rng: random.Random):
    """Yield request indices, sleeping the drawn interval before each."""
    for i, wait in enumerate(arrival_intervals(n, rate, burstiness, rng)):
        if wait:
            await asyncio.sleep(wait)
        yield i


async def _one_request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    req: BenchRequest,
    t0: float,
    extra_body: dict,
    chat: bool,
    stream: bool = True,
) -> RequestResult:
    res = RequestResult(prompt_len=req.prompt_len, output_len_requested=req.output_len)
    body: dict = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
        "ignore_eos": True,
        **extra_body,
    }
    if chat:
        text = req.prompt if isinstance(req.prompt, str) else None
        if text is None:
            res.error = "chat endpoint needs text prompts (drop --tokenizer)"
            return res
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = req.prompt
    start = time.perf_counter()
    res.start = start - t0
    last = start
    if not stream:
        return await _one_plain_request(client, url, body, res, start, t0)
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                usage = chunk.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                choices = chunk.get("choices") or []
                content = "".join((c.get("text") or (c.get("delta") or {}).get("content") or "") for c in choices)
                res.text += content
                if not content:
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                res.chunk_times.append(now - t0)
                last = now
        res.latency = time.perf_counter() - start
        if res.output_tokens == 0:  # server without include_usage: count content chunks
            res.output_tokens = len(res.chunk_times)
        res.success = res.ttft > 0.0
        if not res.success:
            res.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def _one_plain_request(client: httpx.AsyncClient, url: str, body: dict, res: RequestResult, start: float,
                             t0: float) -> RequestResult:
    """A non-streamed request: the whole completion comes at once (its TTFT is its latency)."""
    try:
        resp = await client.post(url, json=body)
        now = time.perf_counter()
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
            return res
        doc = resp.json()
        usage = doc.get("usage") or {}
        res.output_tokens = int(usage.get("completion_tokens") or 0)
        res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        res.text = "".join((c.get("text") or (c.get("message") or {}).get("content") or "")
                           for c in doc.get("choices") or [])
        res.ttft = res.latency = now - start
        res.chunk_times.append(now - t0)
        res.success = res.output_tokens > 0
        if not res.success:
            res.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_serve_benchmark(
    base_url: str,
    model: str,
    requests: list[BenchRequest],
    *,
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    endpoint: str = "/v1/completions",
    extra_body: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    timeout: float = 600.0,
    stream: bool = True,
) -> tuple[list[RequestResult], float]:
    """Send every request, return the per-request results and the benchmark's duration (s).
    ``stream=False`` asks for whole responses (TTFT then equals the latency; no ITL)."""
    from tqdm import tqdm

    url = base_url.rstrip("/") + endpoint
    chat = endpoint.endswith("/chat/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_concurrency or 10_000, max_keepalive_connections=100)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress)
    rng = random.Random(seed)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def guarded(req: BenchRequest) -> RequestResult:
            if sem is None:
                r = await _one_request(client, url, model, req, t0, extra_body or {}, chat, stream)
            else:
                async with sem:
                    r = await _one_request(client, url, model, req, t0, extra_body or {}, chat, stream)
            bar.update(1)
            return r

        tasks = []
        async for i in _arrivals(len(requests), request_rate, burstiness, rng):
            tasks.append(asyncio.create_task(guarded(requests[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    bar.close()
    return list(results), duration


def _percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    arr = np.asarray(values, dtype=float) * 1000.0  # milliseconds
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
    }


def summarize(results: list[RequestResult], duration: float) -> dict:
    """The figures ``vllm bench serve`` reports, in milliseconds for latencies."""
    ok = [r for r in results if r.success]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or r.prompt_len for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _percentiles([r.ttft for r in ok]),
        "tpot_ms": _percentiles(tpot),
        "itl_ms": _percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": _percentiles([r.latency for r in ok]),
    }


def format_summary(summary: dict, title: str = "Serving Benchmark Result") -> str:
    lines = [f"{'=' * 20} {title} {'=' * 20}"]
    lines.append(f"{'Successful requests:':<40}{summary['completed']:>12}")
    lines.append(f"{'Failed requests:':<40}{summary['failed']:>12}")
    lines.append(f"{'Benchmark duration (s):':<40}{summary['duration_s']:>12.2f}")
    lines.append(f"{'Total input tokens:':<40}{summary['total_input_tokens']:>12}")
    lines.append(f"{'Total generated tokens:':<40}{summary['total_output_tokens']:>12}")
    lines.append(f"{'Request throughput (req/s):':<40}{summary['request_throughput']:>12.2f}")
    lines.append(f"{'Output token throughput (tok/s):':<40}{summary['output_throughput']:>12.2f}")
    lines.append(f"{'Total token throughput (tok/s):':<40}{summary['total_token_throughput']:>12.2f}")
    for key, name in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                      ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{name}{'-' * 15}")
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {key[:-3].upper()} (ms):':<40}{summary[key][stat]:>12.2f}")
    if summary["errors"]:
        lines.append("errors: " + "; ".join(summary["errors"]))
    return "\n".join(lines)


def results_as_dict(results: list[RequestResult]) -> list[dict]:
    return [asdict(r) for r in results]
