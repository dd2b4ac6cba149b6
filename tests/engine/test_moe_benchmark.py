"""benchmarks/moe.py runs end to end on tiny shapes and writes its result and plot (timings on the
CPU mean nothing here); both models really have the same active parameters (but the router)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_moe_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("moe_bench", BENCHMARKS / "moe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--hidden", "64", "--layers", "1", "--experts", "4", "--top-k", "2", "--expert-intermediate", "32",
                     "--num-prompts", "3", "--prompt-len", "8", "--output-len", "2", "--repeats", "1",
                     "--out", str(tmp_path)])
    assert rc == 0
    (result_file,) = tmp_path.glob("moe-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    moe, dense = result["runs"]["moe"], result["runs"]["dense"]
    router = 4 * 64  # [experts, hidden], the one extra matmul a MoE token does
    assert moe["active_params"] == dense["active_params"] + router and dense["active_params"] == dense["total_params"]
    assert moe["total_params"] - moe["active_params"] == 2 * 3 * 64 * 32  # the two experts a token skips
    assert moe["output_tokens"] == dense["output_tokens"] == 6 and result["ratio_to_dense"]["dense"] == 1.0
