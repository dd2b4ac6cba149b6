"""How outputs get from the engine thread to the handlers (``async_engine``, ``async_types``): a step's
outputs in one hand-over, a newer cumulative output replacing an unread one, outputs the engine made
shared with no later step, FINAL_ONLY requests answered once with the metrics of a streamed request,
and several prompts of one request streamed together (``serving._merged``)."""

from __future__ import annotations

import asyncio
import json

from fastapi.testclient import TestClient

from pageant.engine import LLMEngine, SamplingParams
from pageant.engine.sampling_params import RequestOutputKind
from pageant.engine.server.app import ServerConfig, build_app
from pageant.engine.server.async_engine import AsyncEngine
from pageant.engine.server.async_types import _Stream, deliver_threadsafe
from pageant.engine.server.metrics import ServerMetrics

PROMPT = {"prompt_token_ids": [1, 40, 41, 42, 43, 44, 45]}


class _Out:
    def __init__(self, n: int, finished: bool = False):
        self.n, self.finished = n, finished


class _RecordingLoop:
    """Stands in for an event loop: runs ``call_soon_threadsafe`` callbacks at once, counting them."""

    def __init__(self):
        self.calls = 0

    def call_soon_threadsafe(self, fn, *args):
        self.calls += 1
        fn(*args)


def test_stream_keeps_the_newest_cumulative_output_and_every_error():
    loop = _RecordingLoop()
    s = _Stream(loop)
    a, b, c = _Out(1), _Out(2), _Out(3, finished=True)
    s.put(a)
    s.put(b)
    assert s.take() == [b]  # the reader fell behind: the newest cumulative output says all
    s.put(c)
    err = RuntimeError("boom")
    s.put(err)
    assert s.take() == [c, err]  # an error never replaces an output, nor is replaced
    delta = _Stream(loop, coalesce=False)  # DELTA outputs: each holds only its own step's news
    delta.put(a)
    delta.put(b)
    assert delta.take() == [a, b] and delta.take() == []


def test_a_steps_outputs_cross_in_one_call_per_loop():
    loop_a, loop_b = _RecordingLoop(), _RecordingLoop()
    streams = [_Stream(loop_a) for _ in range(3)] + [_Stream(loop_b) for _ in range(2)]
    outs = [_Out(i) for i in range(5)]
    deliver_threadsafe(list(zip(streams, outs)))
    assert (loop_a.calls, loop_b.calls) == (1, 1)
    assert [s.take() for s in streams] == [[o] for o in outs]


def test_outputs_a_reader_holds_are_not_changed_by_later_steps(tiny_checkpoint):
    """The engine thread hands over the engine's own outputs (no copy): each step's must be new lists."""
    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=128, num_kv_blocks=16)
    async_engine = AsyncEngine(engine)  # not started: this test steps it on the event loop's thread

    async def scenario():
        stream = _Stream(asyncio.get_running_loop())
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
        engine.add_request("r", PROMPT, params)
        async_engine._streams["r"] = stream
        held = []
        while not held or not held[-1][0].finished:
            async_engine._step()
            await asyncio.sleep(0)  # the delivery callback runs
            for out in stream.take():
                c = out.outputs[0]
                held.append((out, list(c.token_ids), c.text, len(c.logprobs), out.metrics.last_token_time))
        return held

    held = asyncio.run(scenario())
    assert len(held) == 6  # one output per step, read before the next step
    final = held[-1][0].outputs[0].token_ids
    for i, (out, ids, text, num_logprobs, last_token_time) in enumerate(held):
        c = out.outputs[0]
        assert c.token_ids == ids == final[: i + 1] and c.text == text and len(c.logprobs) == num_logprobs == i + 1
        assert out.metrics.last_token_time == last_token_time


def _count(metrics: ServerMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"model_name": "m"}) or 0.0


def test_final_only_gets_one_output_and_the_metrics_of_a_streamed_request(tiny_checkpoint):
    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=128, num_kv_blocks=16)
    metrics = ServerMetrics("m", engine.stats)
    async_engine = AsyncEngine(engine, metrics)

    async def run(rid: str, kind: RequestOutputKind):
        params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, output_kind=kind)
        handle = await async_engine.open(rid, PROMPT, params)
        try:
            return [out async for out in handle.outputs()]
        finally:
            handle.close()

    async def scenario():
        async_engine.start()
        try:
            final_only = await run("final", RequestOutputKind.FINAL_ONLY)
            counts = [_count(metrics, f"vllm:{n}_count") for n in ("time_to_first_token_seconds",
                                                                    "inter_token_latency_seconds")]
            streamed = await run("streamed", RequestOutputKind.CUMULATIVE)
            return final_only, counts, streamed
        finally:
            async_engine.stop()

    final_only, (ttft, itl), streamed = asyncio.run(scenario())
    assert len(final_only) == 1 and final_only[0].finished
    assert final_only[0].outputs[0].token_ids == streamed[-1].outputs[0].token_ids and len(streamed) >= 1
    assert (ttft, itl) == (1, 4)  # as a streamed request's: the first token, then 4 gaps between steps
    assert _count(metrics, "vllm:time_to_first_token_seconds_count") == 2
    assert _count(metrics, "vllm:inter_token_latency_seconds_count") == 8
    assert _count(metrics, "vllm:time_per_output_token_seconds_count") == 8
    assert _count(metrics, "vllm:e2e_request_latency_seconds_count") == 2
    assert not async_engine._final_only and not metrics._last  # nothing kept for finished requests


def test_several_prompts_stream_together_as_they_complete_alone(tiny_checkpoint):
    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=128, num_kv_blocks=32)
    body = {"prompt": ["The assert statement is", "Lists are", "A"], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    with TestClient(build_app(engine, ServerConfig(log_requests=False))) as client:
        whole = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in map(json.loads, events[:-1]):
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                reasons[c["index"]] = c["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert reasons == {0: "length", 1: "length", 2: "length"}
