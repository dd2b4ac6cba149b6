"""Faults and lifecycle of a tensor-parallel engine: a killed or hung rank fails the requests in
flight and the engine (never a silent hang); shutdown, ``with`` and garbage collection leave no
process behind; sizes a model cannot split fail at startup with a clear message."""

from __future__ import annotations

import gc
import os
import signal
import time

import pytest

from pageant.engine import LLM, SamplingParams
from pageant.engine.distributed.executor import WorkerFailedError
from tests.distributed.conftest import wait_gone, worker_processes

SP = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1, 5, 6, 7]}, {"prompt_token_ids": [1, 9, 10]}]


def test_killed_worker_fails_requests_and_engine(make_checkpoint):
    llm = LLM(model=make_checkpoint("llama"), tensor_parallel_size=2)
    assert llm.engine.fatal_error is None
    llm.generate(PROMPTS, SP, use_tqdm=False)
    (worker,) = worker_processes()
    worker.kill()
    t0 = time.monotonic()
    with pytest.raises(WorkerFailedError):
        llm.generate(PROMPTS, SP, use_tqdm=False)
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5  # the watcher names the worker that exited
    while "exited with code" not in (llm.engine.fatal_error or "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "exited with code -9" in llm.engine.fatal_error
    assert not llm.engine.has_unfinished_requests()  # the failed requests were dropped, their blocks freed
    assert llm.stats()["num_free_kv_blocks"] == llm.stats()["num_kv_blocks"]
    with pytest.raises(WorkerFailedError):  # and it stays failed
        llm.generate(PROMPTS, SP, use_tqdm=False)
    llm.shutdown()


def test_hung_worker_fails_after_the_timeout(make_checkpoint):
    llm = LLM(model=make_checkpoint("llama"), tensor_parallel_size=2, distributed_timeout_seconds=3)
    (worker,) = worker_processes()
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerFailedError):
            llm.generate(PROMPTS, SP, use_tqdm=False)
        assert 2 < time.monotonic() - t0 < 30
        assert llm.engine.fatal_error is not None
    finally:
        os.kill(worker.pid, signal.SIGCONT)
        llm.shutdown()
    assert not wait_gone()


def test_shutdown_with_and_gc_leave_no_process(make_checkpoint):
    path = make_checkpoint("llama")
    llm = LLM(model=path, tensor_parallel_size=2)
    assert len(worker_processes()) == 1
    llm.shutdown()
    assert not wait_gone(timeout=5)
    llm.shutdown()  # twice is fine

    with LLM(model=path, pipeline_parallel_size=2) as llm:
        assert llm.generate(PROMPTS, SP, use_tqdm=False)
    assert not wait_gone(timeout=5)

    llm = LLM(model=path, tensor_parallel_size=2)
    del llm
    gc.collect()
    assert not wait_gone(timeout=5)


@pytest.mark.parametrize("overrides, kwargs, message", [
    ({}, {"tensor_parallel_size": 3}, "4 attention heads do not split over tensor_parallel_size=3"),
    ({"intermediate_size": 98}, {"tensor_parallel_size": 4}, "intermediate size 98 does not split"),
    ({"num_key_value_heads": 4, "num_attention_heads": 8}, {"tensor_parallel_size": 8 // 3 * 3},
     "4 KV heads neither split over nor replicate evenly to tensor_parallel_size=6"),
    ({}, {"pipeline_parallel_size": 3}, "2 layers, fewer than pipeline_parallel_size=3"),
    ({}, {"tensor_parallel_size": 2, "nnodes": 2}, "needs master_addr and master_port"),
    ({}, {"tensor_parallel_size": 2, "nnodes": 2, "node_rank": 1}, "start other nodes with --headless"),
])
def test_bad_sizes_fail_at_startup(make_checkpoint, overrides, kwargs, message):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=message):
        LLM(model=make_checkpoint("llama", **overrides), **kwargs)
    assert time.monotonic() - t0 < 10  # refused before any worker starts
    assert not worker_processes()


def test_pipeline_parallel_refused_for_families_without_stages(make_checkpoint):
    with pytest.raises(ValueError, match="pipeline parallelism is not supported for GPTNeoXForCausalLM"):
        LLM(model=make_checkpoint("gpt_neox"), pipeline_parallel_size=2)
