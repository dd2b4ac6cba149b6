"""Fixtures for the server tests: a tiny checkpoint and real `pageant serve` subprocesses.

``serve(*args)`` starts ``python -m pageant.cli serve --model <tiny> --port <free> ...``, waits for
``/ready`` and stops it with SIGTERM at the end of the fixture's scope (its log is printed on failure).
"""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

API_KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `pageant serve` subprocess on 127.0.0.1:<port>."""

    def __init__(self, args: list[str], log_path: pathlib.Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        full_env.pop("PAGEANT_API_KEY", None)
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "pageant.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of one series from /metrics (0.0 when absent)."""
        return parse_metric(httpx.get(f"{self.base_url}/metrics", timeout=10).text, name, labels)


def parse_metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


@pytest.fixture(scope="module")
def serve(tmp_path_factory, tiny_checkpoint):
    """Factory: ``serve(*args, model=..., env=...)`` starts a server (stopped at module end)."""
    started: list[ServerProcess] = []

    def start(*args: str, model: str | None | bool = True, env: dict[str, str] | None = None,
              wait: bool = True) -> ServerProcess:
        model_args = ["--model", str(tiny_checkpoint)] if model is True else ([] if model in (None, False) else ["--model", model])
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess([*model_args, *args], log, env)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def api_server(serve) -> ServerProcess:
    """The module's main server: the tiny model, an API key, a small context."""
    return serve("--api-key", API_KEY, "--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "16",
                 "--served-model-name", "tiny", "--disable-log-requests", "--uvicorn-log-level", "warning")


@pytest.fixture(scope="session")
def make_server_adapter(tmp_path_factory, tiny_checkpoint):
    """``make_server_adapter(seed) -> dir``: a PEFT LoRA adapter (random non-zero A and B) for the tiny model."""

    def make(seed: int, root: pathlib.Path | None = None) -> str:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:  # peft zero-inits B: make the adapter matter
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        out = (root or tmp_path_factory.mktemp("adapters")) / f"adapter-{seed}"
        model.save_pretrained(str(out))
        return str(out)

    return make
