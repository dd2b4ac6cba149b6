"""benchmarks/lora.py and benchmarks/lora_kernels.py run end to end on tiny shapes and write their
result and plot (timings on the CPU mean nothing here)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke(tmp_path):
    bench = _load("lora")
    rc = bench.main(["--hidden", "64", "--layers", "1", "--rank", "4", "--num-prompts", "4", "--prompt-len", "8",
                     "--output-len", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    (result_file,) = tmp_path.glob("lora-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    assert result["benchmark"] == "lora" and result["timing"] == "cpu"
    assert result["settings"]["adapter_ranks"] == [4, 4, 2, 1] and "out" not in result["settings"]
    names = ["base", "base, lora on", "1 adapter", "4 adapters", "4 adapters, 2 slots"]
    assert list(result["runs"]) == names and result["ratio_to_base"]["base"] == 1.0
    assert all(result["runs"][n]["output_tokens"] == 4 * 2 and result["runs"][n]["tokens_per_s"] > 0 for n in names)


def test_kernel_benchmark_smoke(tmp_path):
    assert _load("lora_kernels").main(["--quick", "--out", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("lora-kernels-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    assert result["benchmark"] == "lora-kernels" and result["settings"]["hidden"] == 128
    assert [row["num_tokens"] for row in result["rows"]] == [1, 16]
    # each row's delta was checked against the reference before timing (the script asserts it)
    assert all(row["base_ms"] > 0 and {"triton_over_base", "torch_over_base"} <= set(row) for row in result["rows"])
