"""benchmarks/e2e_gpu.py on the CPU: it exits 2 without CUDA, and its model builder (dummy bf16
weights from a config.json) and measurement helpers work on a tiny shape."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "e2e_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("e2e_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_exits_2_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--result-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_tiny_dummy_model_path(tmp_path):
    e2e = _load()
    model_dir = e2e.write_model_dir(tmp_path / "model", "tiny")
    assert not list(model_dir.glob("*.safetensors"))
    engine = e2e.build_engine(model_dir, device="cpu", dtype="bfloat16", max_num_seqs=8,
                              max_num_batched_tokens=64, max_model_len=256, num_kv_blocks=64)
    assert engine.config.load_format == "dummy"
    assert e2e.weight_bytes(engine) == 2 * sum(p.numel() for p in engine.runner.model.parameters())
    step = e2e.decode_step_time(engine, batch=4, context=40, num_steps=3)
    assert step > 0 and not engine.has_unfinished_requests()
    requests = e2e.sharegpt_requests(6, engine.vocab_size)
    requests = [(ids[:100], min(n, 20)) for ids, n in requests]
    result = e2e.throughput(engine, requests)
    assert result["output_tokens"] == sum(n for _, n in requests)


def test_plot_writes_png(tmp_path):
    e2e = _load()
    report = {"config": {"shape": "tiny"},
              "decode": [{"batch": b, "context": 128, "step_ms": 1.0 + b, "roofline_ms": 0.5 + b} for b in (1, 8)],
              "throughput": {"output_tokens_per_s": 100.0},
              "hf": {"pageant": {"output_tokens_per_s": 90.0}, "runs": [{"name": "hf_batch16", "output_tokens_per_s": 30.0}]}}
    e2e.plot(report, tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000
