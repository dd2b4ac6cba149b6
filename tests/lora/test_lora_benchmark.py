"""benchmarks/lora.py runs end to end on a tiny model and writes its result and plot."""

from __future__ import annotations

import importlib.util
import json
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "lora.py"


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("lora_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
