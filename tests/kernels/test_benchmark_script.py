"""benchmarks/kernels.py: its CPU refusal, and its measuring code on tiny shapes in the interpreter.

The timings here are meaningless (a wall clock around interpreted kernels); the point is that the
script's plumbing (paged inputs, SDPA comparison, tuning sweep, plot) works before a GPU runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from pageant.kernels import attention_decode, attention_prefill

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timer(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the benchmark instead")
def test_exits_with_a_message_without_a_gpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr


def test_measuring_code_on_tiny_shapes(tmp_path, capsys):
    bench = _load()
    args = argparse.Namespace(num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, dtype="float32")
    no_bar = lambda it, desc: it  # noqa: E731
    rows = bench.bench_decode(torch, _timer, F, attention_decode, args, torch.float32, 1e9,
                              [(2, 20)], no_bar, "cpu", 4)
    assert rows[0]["rel_error_vs_sdpa"] < 1e-5
    assert rows[0]["bytes"] == 2 * 2 * 20 * 2 * 16 * 4 + 2 * 2 * 4 * 16 * 4
    tune = bench.tune_decode(torch, _timer, attention_decode, args, torch.float32, 1e9, no_bar, "cpu", 4,
                             [(1, 40)], [(16, 4, 2)])
    assert tune and all(r["rel_error"] < 1e-5 for r in tune)
    prefill = bench.bench_prefill(torch, _timer, F, attention_prefill, args, torch.float32, no_bar, "cpu", [(2, 12)],
                                  [None, (16, 16, 4, 2)])
    assert len(prefill) == 2 and all(r["rel_error_vs_sdpa"] < 1e-5 and "triton_us" in r for r in prefill)
    bench.print_summary({"decode": rows, "tune": tune, "prefill": prefill})
    bench.plot(rows, tmp_path / "plot.png", "test")
    assert (tmp_path / "plot.png").stat().st_size > 0
    summary = capsys.readouterr().out
    assert "best launch settings" in summary and "prefill batch 2 len 12" in summary
