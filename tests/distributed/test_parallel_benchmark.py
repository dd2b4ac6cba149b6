"""benchmarks/parallel.py runs end to end on tiny shapes and writes its result and plot (CPU timings
mean nothing here); every configuration gives the same greedy tokens."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_parallel_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("parallel_bench", BENCHMARKS / "parallel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--hidden", "64", "--layers", "2", "--num-prompts", "3", "--prompt-len", "8", "--output-len", "3",
                     "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    (result_file,) = tmp_path.glob("parallel-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    assert result["greedy_outputs_identical"] is True
    assert set(result["runs"]) == {"tp1 (2 threads)", "tp2 (2 ranks x 1 thread)", "tp1 (1 thread)"}
    # (CPU time is counted in 10 ms ticks: a run this small may count none)
    assert all(r["output_tokens"] == 9 and r["cpu_ms_per_token"] >= 0 for r in result["runs"].values())
    assert result["ratio_to_tp1"]["tp1 (2 threads)"] == 1.0
