"""Shared fixtures: tiny checkpoints built once per test session (no network), and real
`pageant serve` subprocesses for any test folder.

``serve(*args)`` starts ``python -m pageant.cli serve --model <tiny> --port <free> ...``, waits for
``/ready`` and stops it with SIGTERM at the end of the test module (its log is in the error when it
exits or never gets ready). ``server_process`` is the ``ServerProcess`` class itself, for tests that
manage a server's lifetime themselves (test modules cannot import conftest under importlib mode).

Triton decides between its CPU interpreter and the GPU compiler when a kernel module is first
imported, and several test folders import kernels (kernels, lora, engine with the triton backend).
This root conftest is imported before any of them, so it is the one place that can choose the
interpreter for the whole session: the suite runs on machines without a GPU. On a GPU machine,
run with ``TRITON_INTERPRET=0`` to compile the kernels instead.

Prerequisites from outside PyPI (``helm``, the upstream CRD schemas, Debian's ``prometheus``) are
looked up by ``require_helm()``, ``require_schemas_dir()`` and ``require_prometheus()`` here (the
folder conftests import them as ``tests.conftest``): a missing one skips the test with what is
missing and how to get it (``bash tests/run`` installs all three), and the closing summary counts
those skips. With ``PAGEANT_STRICT_PREREQUISITES=1`` (CI) a missing prerequisite fails instead.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# What a skip for a missing prerequisite starts with: the summary counts the skips that do.
PREREQUISITE_MISSING = ("helm not found", "upstream CRD schemas not found", "prometheus not found",
                        "promtool not found")


def _missing(message: str):
    if os.environ.get("PAGEANT_STRICT_PREREQUISITES") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_helm() -> str:
    """The ``helm`` binary: .venv/bin/helm (extracted by .ci/install-helm), else one on PATH."""
    for candidate in (ROOT / ".venv" / "bin" / "helm", shutil.which("helm")):
        if candidate and pathlib.Path(candidate).exists():
            return str(candidate)
    _missing("helm not found: run `bash tests/run` or `bash .ci/install-helm .venv/bin`")


def require_schemas_dir(*files: str) -> pathlib.Path:
    """The folder of upstream CRD schemas: $PAGEANT_SCHEMAS_DIR, else ../shared/schemas beside the
    checkout; it must hold ``files`` (names in it) when given."""
    folder = pathlib.Path(os.environ.get("PAGEANT_SCHEMAS_DIR") or ROOT.parent / "shared" / "schemas")
    absent = [f for f in files if not (folder / f).is_file()]
    if not folder.is_dir() or absent:
        what = f"no folder {folder}" if not folder.is_dir() else f"{', '.join(absent)} not in {folder}"
        _missing(f"upstream CRD schemas not found ({what}): set PAGEANT_SCHEMAS_DIR or run "
                 "`python tests/fetch_schemas.py DIR` and set PAGEANT_SCHEMAS_DIR=DIR")
    return folder


def require_prometheus(binary: str = "prometheus") -> str:
    """``prometheus`` or ``promtool`` (both from Debian's prometheus package) on PATH."""
    found = shutil.which(binary)
    if not found:
        _missing(f"{binary} not found: `apt-get install prometheus` (as root; `bash tests/run` does)")
    return found


def _prerequisite_reports(terminalreporter, outcome: str) -> list[tuple[str, str]]:
    """(test id, message) of each ``outcome`` report that is about a missing prerequisite."""
    out = []
    for report in terminalreporter.stats.get(outcome, []):
        longrepr = getattr(report, "longrepr", None)
        text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr or "")
        for line in text.splitlines():
            line = line.strip().removeprefix("Skipped: ").removeprefix("E ").strip()
            if line.startswith(PREREQUISITE_MISSING):
                out.append((getattr(report, "nodeid", "?"), line))
                break
    return out


def pytest_terminal_summary(terminalreporter):
    """"prerequisite skips: N", then each missing prerequisite with how many tests it skipped."""
    skips = _prerequisite_reports(terminalreporter, "skipped")
    failed = _prerequisite_reports(terminalreporter, "failed") + _prerequisite_reports(terminalreporter, "error")
    terminalreporter.write_line(f"prerequisite skips: {len(skips)}")
    for label, reports in (("skipped", skips), ("failed (PAGEANT_STRICT_PREREQUISITES=1)", failed)):
        counts: dict[str, int] = {}
        for _, message in reports:
            counts[message] = counts.get(message, 0) + 1
        for message, n in counts.items():
            terminalreporter.write_line(f"  {n} test(s) {label}: {message}")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(arch="llama", num_shards=1, **overrides) -> path``, built once per arguments."""
    from pageant.engine.testing import build_checkpoint

    built: dict[tuple, str] = {}

    def make(arch: str = "llama", num_shards: int = 1, **overrides) -> str:
        key = (arch, num_shards, repr(sorted(overrides.items())))  # repr: list values (eos ids) too
        if key not in built:
            path = tmp_path_factory.mktemp(f"ckpt-{arch}")
            built[key] = str(build_checkpoint(path, arch=arch, num_shards=num_shards, **overrides))
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> str:
    """A tiny random llama checkpoint with the trained BPE tokenizer."""
    return make_checkpoint("llama")



def _build_adapter(base_path: str, out: pathlib.Path, *, r: int, alpha: float, targets, seed: int,
                   use_rslora: bool = False, std: float = 0.3, **extra) -> str:
    """Save a PEFT LoRA adapter for the checkpoint at ``base_path`` with random non-zero A and B
    (``std`` times a standard normal, from a generator seeded with ``seed``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        use_rslora=use_rslora, task_type="CAUSAL_LM", **extra)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:  # peft zero-inits B: make the adapter matter
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory):
    """``make_adapter(base_path, r=4, alpha=8, targets=(...), seed=0, root=None, std=0.3, **lora_config)
    -> adapter dir``: a PEFT-saved LoRA adapter, built once per arguments."""
    built: dict[tuple, str] = {}

    def make(base_path: str, r: int = 4, alpha: float = 8, targets=("q_proj", "v_proj"), seed: int = 0,
             root: pathlib.Path | None = None, std: float = 0.3, **extra) -> str:
        key = (base_path, r, alpha, tuple(targets), seed, str(root), std, repr(sorted(extra.items())))
        if key not in built:
            parent = root if root is not None else tmp_path_factory.mktemp("adapters")
            out = parent / f"lora-r{r}-s{seed}-{len(built)}"
            built[key] = _build_adapter(base_path, out, r=r, alpha=alpha, targets=targets, seed=seed, std=std,
                                        **extra)
        return built[key]

    return make

def _hf_greedy(path: str, prompts: list[list[int]], max_new: int, adapter: str | None = None) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=None, pad_token_id=0,
            )
            outs.append(out[0, len(ids):].tolist())
    return outs


@pytest.fixture(scope="session")
def hf_greedy():
    """``hf_greedy(path, prompts, max_new, adapter=None) -> [[token ids]]``: exactly ``max_new`` greedy
    tokens per prompt (token ids) from Hugging Face transformers (float32, CPU, no EOS stop), with the
    PEFT ``adapter`` merged into the weights when given: the reference the engine must equal."""
    return _hf_greedy


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
        import httpx

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
        import httpx

        return parse_metric(httpx.get(f"{self.base_url}/metrics", timeout=10).text, name, labels)


def parse_metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``, in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


@pytest.fixture(scope="session")
def server_process() -> type[ServerProcess]:
    """The ``ServerProcess`` class (``ServerProcess(args, log_path, env)``; ``.wait_ready()``, ``.stop()``)."""
    return ServerProcess


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
