"""``pageant serve -tp 2`` answers the real openai client with the single-rank engine's tokens; a
rank that dies mid-stream turns into an error event and the server exits non-zero within seconds;
a second "node" started with ``--headless`` joins node 0's rendezvous and serves its ranks."""

from __future__ import annotations

import subprocess
import sys
import time

import openai
import psutil
import pytest

from pageant.engine import LLM, SamplingParams
from tests.conftest import free_port
from tests.distributed.conftest import wait_gone, worker_processes

PROMPT = [1, 17, 42, 99, 7, 250]


def single_rank(path: str, max_tokens: int):
    out = LLM(model=path).generate([{"prompt_token_ids": PROMPT}],
                                   SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                   use_tqdm=False)
    return out[0].outputs[0]


def test_serve_tensor_parallel_with_openai_client(serve, tiny_checkpoint):
    server = serve("-tp", "2", "--pipeline-parallel-size", "1", "--enable-prefix-caching")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
    model = client.models.list().data[0].id
    expected = single_rank(tiny_checkpoint, 12)
    done = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text == expected.text
    assert len(done.choices[0].logprobs.tokens) == 12
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert server.metric("vllm:num_requests_running") == 0

    (worker,) = worker_processes(server.proc.pid)
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=500, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the request is running
    worker.kill()
    t0 = time.monotonic()
    with pytest.raises((openai.APIError, openai.APIConnectionError)):
        for _ in stream:
            pass
    assert server.proc.wait(timeout=20) != 0  # so that Kubernetes restarts the pod
    assert time.monotonic() - t0 < 20
    assert "exited with code -9" in server.output()


def test_headless_node_joins_node_zero(tiny_checkpoint, tmp_path):
    port = free_port()
    common = ["--model", tiny_checkpoint, "-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port)]
    log = open(tmp_path / "headless.log", "wb")
    node1 = subprocess.Popen([sys.executable, "-m", "pageant.cli", "serve", "--headless", "--node-rank", "1", *common],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        expected = single_rank(tiny_checkpoint, 10).token_ids
        llm = LLM(model=tiny_checkpoint, tensor_parallel_size=2, nnodes=2, node_rank=0, master_addr="127.0.0.1",
                  master_port=port)
        assert all(p.ppid() == node1.pid for p in worker_processes())  # node 0 runs rank 0 only, here
        assert len(worker_processes(node1.pid)) == 1
        out = llm.generate([{"prompt_token_ids": PROMPT}],
                           SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        assert out[0].outputs[0].token_ids == expected
        llm.shutdown()
        assert node1.wait(timeout=20) == 0, (tmp_path / "headless.log").read_text()
        assert not wait_gone(node1.pid)
    finally:
        if node1.poll() is None:
            for p in psutil.Process(node1.pid).children(recursive=True):
                p.kill()
            node1.kill()
        log.close()


def test_headless_refuses_node_zero(tiny_checkpoint):
    done = subprocess.run([sys.executable, "-m", "pageant.cli", "serve", "--headless", "--model", tiny_checkpoint,
                           "-tp", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--headless runs the ranks of a node other than node 0" in done.stderr


def test_sigterm_stops_every_rank(serve):
    server = serve("-tp", "2")
    (worker,) = worker_processes(server.proc.pid)
    assert server.stop() == 0  # SIGTERM: drain, then the workers are shut down
    deadline = time.monotonic() + 10
    while psutil.pid_exists(worker.pid) and worker.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
