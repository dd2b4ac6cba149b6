"""`pageant bench serve` end to end against a real `pageant serve` (tiny checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def server(serve):
    return serve("--max-num-seqs", "8", "--max-model-len", "256", "--served-model-name", "tiny",
                 "--disable-log-requests", "--uvicorn-log-level", "warning")


def _bench(server, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "pageant.cli", "bench", "serve", "--base-url", server.base_url,
           "--save-result", "--result-dir", str(out_dir), "--label", "run", "--no-progress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out_dir / "run.png").stat().st_size > 10_000
    return proc, json.loads((out_dir / "run.json").read_text())


def test_random_dataset_at_two_rates(server, tmp_path):
    proc, doc = _bench(server, tmp_path, "--num-prompts", "6", "--request-rate", "20,inf",
                       "--input-len", "4:30", "--output-len", "3:12", "--endpoint", "/v1/completions")
    assert doc["model"] == "tiny"  # discovered through /v1/models
    assert [run["request_rate"] for run in doc["runs"]] == ["20.0", "inf"]
    for run in doc["runs"]:
        s = run["summary"]
        assert s["completed"] == 6 and s["failed"] == 0
        # ignore_eos: the server generated exactly the requested lengths, and usage reported them
        assert s["total_output_tokens"] == sum(r["output_len_requested"] for r in run["requests"])
        assert all(r["ttft"] > 0 and r["latency"] >= r["ttft"] for r in run["requests"])
        assert s["ttft_ms"]["p99"] >= s["ttft_ms"]["median"] > 0
        assert s["e2e_ms"]["mean"] >= s["ttft_ms"]["mean"]
    assert "Serving Benchmark Result (rate 20 req/s)" in proc.stdout
    assert "Mean TPOT (ms):" in proc.stdout


def test_prefix_dataset_on_chat_with_concurrency_cap(server, tmp_path):
    _, doc = _bench(server, tmp_path, "--num-prompts", "5", "--dataset", "prefix", "--prefix-len", "20",
                    "--num-prefixes", "2", "--input-len", "2:6", "--output-len", "2:6",
                    "--endpoint", "/v1/chat/completions", "--max-concurrency", "2")
    (run,) = doc["runs"]
    assert run["summary"]["completed"] == 5
    # chat prompts are wrapped by the chat template: the server counts more prompt tokens than words
    assert all(r["prompt_tokens"] > r["prompt_len"] for r in run["requests"])


def test_failures_are_counted_not_hidden(server, tmp_path):
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "pageant.cli", "bench", "serve", "--base-url", server.base_url,
           "--model", "no-such-model", "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
           "--no-progress", "--save-result", "--result-dir", str(out_dir), "--label", "bad"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    (run,) = json.loads((out_dir / "bad.json").read_text())["runs"]
    assert run["summary"]["failed"] == 3 and run["summary"]["completed"] == 0
    assert any("HTTP 404" in e for e in run["summary"]["errors"])
